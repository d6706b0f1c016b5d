"""Segmentation metrics: semantic (FCN table, Dice), surface (HD95, surface Dice), EM (ISBI 2012), instances (COCO AP)."""
