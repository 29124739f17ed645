"""finetune: fine-tune pretrained ResNet-family backbones with PyTorch Lightning."""

__version__ = "0.1.0"
