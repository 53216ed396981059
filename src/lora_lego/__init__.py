"""lora-lego: merge LoRA adapters by clustering their rank-one units (LoRA-LEGO, ICLR 2025), and more."""

__version__ = "0.1.0"

from .signals import startup_guard  # noqa: E402  (stdlib only: set before the heavy imports below)

startup_guard()

from .errors import (  # noqa: E402
    AdapterFormatError,
    BaseModelError,
    CalibrationError,
    ClusteringWarning,
    IncompatibleAdaptersError,
    LoraLegoError,
    LoraLegoWarning,
    MethodError,
    OutputError,
    TargetError,
)
from .calibrate import calibrate  # noqa: E402
from .calibration import Calibration, load_calibration  # noqa: E402
from .merge import merge, prune  # noqa: E402
from .formats import load_adapter, save_adapter  # noqa: E402
from .registry import available_methods, get_method, register  # noqa: E402
from .types import Adapter, LoraFactors  # noqa: E402
from .apply import apply_adapter  # noqa: E402
from .auto import merge_auto, score  # noqa: E402

__all__ = [
    "Adapter", "LoraFactors", "load_adapter", "save_adapter", "merge", "prune", "register", "get_method",
    "available_methods", "apply_adapter", "merge_auto", "score", "calibrate", "Calibration", "load_calibration", "LoraLegoError", "AdapterFormatError",
    "BaseModelError", "CalibrationError", "TargetError", "IncompatibleAdaptersError", "MethodError", "OutputError", "LoraLegoWarning", "ClusteringWarning", "__version__",
]
