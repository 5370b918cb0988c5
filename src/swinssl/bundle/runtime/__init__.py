"""The torch-free predictor a bundle carries: numpy only (this module imports nothing of swinssl)."""
