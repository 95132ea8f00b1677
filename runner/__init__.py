"""byol-runner: BYOL vs supervised training on medical images, as a batch experiment runner."""

__version__ = "0.1.0"
