"""unet-pipeline: the U-Net of Ronneberger et al. (2015) for large EM volumes."""
__version__ = "0.1.0"
