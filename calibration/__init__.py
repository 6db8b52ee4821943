"""Calibration."""

# How many tiles calibrate by default: every built-in image's whole view and a spread of crops (see
# `data.chosen_tiles`). Each tile is a full fp32 forward pass of the vision encoder (4.7 s for InternViT-300M on
# 2 cores), which made calibration 70% of a cold 1B build with all 28 tiles; the README gives the demo model's task
# accuracy with this cap and with every tile.
DEFAULT_MAX_TILES = 12
