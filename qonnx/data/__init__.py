"""Calibration data: sources and readers (npz, folders, images, Python iterables) and synthetic images."""
