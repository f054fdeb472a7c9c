"""bnbackdoor: explanation-aware backdoors, and how Re-BN removes them (Backdoors Hide in BatchNorm)."""
__version__ = "0.1.0"
