"""Tiny diffusion models built from configs (no download) for the format tests: an SD 1.x-shaped
pipeline (UNet + CLIP text encoder + VAE, tokenizer None) and a Flux transformer with one double and
one single block. Needs the `formats` extra (diffusers)."""

from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs the formats extra (diffusers)")


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)  # diffusers initialises from the global generator; tests reseed it here only
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2)


# SD 1.x / 2.x UNet layouts, small channels: 4 levels, 2 resnets per level, attention at levels 0-2 (diffusers'
# default block types, which are SD 1.x's); SD 2.x: OpenCLIP's 1024-wide context and linear proj_in / proj_out
SD_UNETS = {"sd1": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4, attention_head_dim=2,
                        sample_size=16, cross_attention_dim=768),
            "sd2": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
                        attention_head_dim=(2, 4, 4, 4), sample_size=16, cross_attention_dim=1024,
                        use_linear_projection=True)}


def tiny_sd_unet(family: str, seed: int = 0):
    """A UNet2DConditionModel of SD 1.x's or 2.x's layout (`family` "sd1" / "sd2") with small channels."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**SD_UNETS[family])


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=1000))


def tiny_sd_pipeline(seed: int = 0):
    """StableDiffusionPipeline with a tiny UNet, CLIP text encoder and VAE (same weights for a seed)."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  latent_channels=4, norm_num_groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=tiny_text_encoder(seed), tokenizer=None, unet=tiny_unet(seed),
            scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)


def tiny_flux_transformer(seed: int = 0):
    """FluxTransformer2DModel with one double block and one single block (inner dim 32)."""
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict (to compare before / after fusing a LoRA)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}
