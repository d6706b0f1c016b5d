"""The inference engine: out-of-core sliding-window inference with overlap-tile stitching."""
