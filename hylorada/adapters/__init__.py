"""The four adapter methods; each module states its formula and holds its forward and merge."""
from .base import AdapterLayer
from .dora import DoRALayer
from .hylorada import HyLoRADALayer
from .lora import LoRALayer
from .lorada import LoRaDALayer

ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "lora": LoRALayer,
    "dora": DoRALayer,
    "hylorada": HyLoRADALayer,
    "lorada": LoRaDALayer,
}

__all__ = ["AdapterLayer", "LoRALayer", "DoRALayer", "HyLoRADALayer", "LoRaDALayer", "ADAPTER_CLASSES"]
