"""Encoder algorithms that choose codes from calibration data (``gptq``); decoding never runs them."""
