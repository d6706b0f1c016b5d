"""U-Net, 2D or 3D, from MONAI (Ronneberger et al. 2015; MONAI's residual-unit variant).

Sized per dataset: the number of levels follows the tile (each level halves it; the deepest
feature map stays at least 4 voxels wide), the width follows ``base_channels``.
"""

from __future__ import annotations


def unet_levels(tile: tuple[int, ...], max_levels: int = 5) -> int:
    """How many resolution levels fit a tile: add one while every axis (of size > 1) still divides
    by 2 ** levels and the smallest stays at least 4 wide at the bottom."""
    axes = [t for t in tile if t > 1]
    levels = 1
    while (levels < max_levels and all(t % 2 ** levels == 0 for t in axes)
           and min(axes) // 2 ** levels >= 4):
        levels += 1
    return levels


def build_unet(spatial_dims: int, in_channels: int, out_channels: int, *, channels: list[int] | None = None,
               base_channels: int = 16, levels: int = 4, num_res_units: int = 2, norm: str = "INSTANCE",
               dropout: float = 0.0, deep_supervision: bool = False):
    """A MONAI U-Net mapping (B, in_channels, *spatial) to (B, out_channels, *spatial) logits.

    Spatial sizes must be divisible by 2 ** (levels - 1); the engine's tiles are. With
    ``deep_supervision`` it is MONAI's DynUNet, nnU-Net's network (Isensee et al. 2021): in training
    it also returns the logits of the two levels above the bottom, upsampled, stacked on axis 1
    (B, 1 + heads, K, *spatial), for a loss on each (tasks/training/loop.py); in eval mode it
    returns the full-resolution logits only, as any U-Net here.
    """
    if deep_supervision:
        from monai.networks.nets import DynUNet

        filters = list(channels) if channels else [base_channels * 2 ** i for i in range(levels)]
        strides = [[1] * spatial_dims] + [[2] * spatial_dims] * (len(filters) - 1)
        return DynUNet(spatial_dims, in_channels, out_channels, kernel_size=[[3] * spatial_dims] * len(filters),
                       strides=strides, upsample_kernel_size=strides[1:], filters=filters, norm_name=norm.lower(),
                       dropout=dropout or None, deep_supervision=True, deep_supr_num=max(1, min(2, len(filters) - 2)),
                       res_block=num_res_units > 0)
    from monai.networks.nets import UNet

    channels = list(channels) if channels else [base_channels * 2 ** i for i in range(levels)]
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=channels, strides=[2] * (len(channels) - 1), num_res_units=num_res_units,
                norm=norm, dropout=dropout)
