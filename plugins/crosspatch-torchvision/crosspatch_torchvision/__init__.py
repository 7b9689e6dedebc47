"""crosspatch adapter for torchvision CNNs (ResNet, ConvNeXt): sites stem, block_in, block, stage, pool, logits."""

from .adapter import IndexedModuleInput, IndexedModuleOutput, TorchvisionAdapter

__all__ = ["IndexedModuleInput", "IndexedModuleOutput", "TorchvisionAdapter"]
__version__ = "0.1.0"
