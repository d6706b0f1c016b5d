"""Calibration of probability maps: monotone cubic (ISBI 2012 winner), isotonic, temperature; scores."""
