"""iddpm_ds: Improved DDPM (Nichol & Dhariwal 2021) trained with DeepSpeed."""

__version__ = "0.1.0"
