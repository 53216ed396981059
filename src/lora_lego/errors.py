"""Typed errors and warnings of lora-lego: every failure a user can cause is a `LoraLegoError`."""


class LoraLegoError(Exception):
    """Base of every error lora-lego raises on bad input."""


class AdapterFormatError(LoraLegoError, ValueError):
    """An adapter folder or file is missing, unreadable, or not a supported LoRA."""


class IncompatibleAdaptersError(LoraLegoError, ValueError):
    """Adapters cannot be merged together (e.g. the same module with different shapes)."""


class MethodError(LoraLegoError, ValueError):
    """Unknown merge method, or a parameter it does not accept or cannot use."""


class CalibrationError(LoraLegoError, ValueError):
    """Calibration input is unusable: a prompts file, a base model, or a calibration file (or it does not fit the
    adapters)."""


class OutputError(LoraLegoError, ValueError):
    """The output location is refused (exists, lies inside an input, or cannot be written)."""


class BaseModelError(LoraLegoError, ValueError):
    """A base model folder that is missing, unreadable, or not a safetensors transformers checkpoint."""


class TargetError(LoraLegoError, ValueError):
    """An adapter, a rank or an output that a serving target (e.g. vLLM) cannot load."""


class LoraLegoWarning(UserWarning):
    """Base of lora-lego's warnings."""


class ClusteringWarning(LoraLegoWarning):
    """K-means produced empty or collapsed clusters."""


def some(keys: list, limit: int = 3) -> str:
    """The first `limit` items, quoted, and how many more (for error messages)."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
