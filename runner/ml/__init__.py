"""The science: backbones, BYOL, augmentations on the device, training loops, metrics, checkpoints.

Nothing here knows about scheduling, containers or the TUI: a worker calls it to train one task.
"""
