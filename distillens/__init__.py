"""distillens: DistillLens knowledge distillation (arXiv 2602.13567) on PyTorch Lightning."""

__version__ = "0.1.0"
