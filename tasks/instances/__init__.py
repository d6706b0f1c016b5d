"""Instances: objects counted and outlined over whole scans (tiled Mask R-CNN, connected components,
seeded watershed), their table, and panoptic output. Storage layout: :mod:`tasks.instances.store`."""
