"""Med-Tuning's Med-Adapter after each encoder stage of a 3D conv U-Net.

y + up(mix(local(h) + global(h) + interaction)), h = GELU(down(y)), where
- down / up: 1x1x1 projections to C / reduction channels and back (up zero-initialised, so the
  adapted network starts as the foundation);
- local: depthwise convs at several kernel sizes, each factorised in-plane (1,k,k) then
  through-plane (k,1,1); nnU-Net puts the through-plane (slice) axis first;
- global: FFT over (D, H, W), a learnable real weight and bias that vary along the slice axis
  only (stored at `slice_bins` positions, interpolated to the number of slice-axis frequencies),
  inverse FFT, magnitude. The weight filters along the whole slice axis at once; the bias is added
  to the in-plane mean (DC) of each slice frequency, as a bias on every in-plane frequency would be
  a spike at one in-plane voxel;
- interaction: the previous stage's adapter features, pooled to this stage's size and projected
  by a 1x1x1 conv (the first stage has none);
- mix: a 1x1x1 conv.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import conv_geometry
from nnunet_fseft.tuners import ADAPTER_TOKEN, Method, Site

BRANCH = ADAPTER_TOKEN + "med_adapter"


class SliceFilter(nn.Module):
    """The global branch: a spectral filter that varies along the slice axis only."""

    def __init__(self, channels: int, slice_bins: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, slice_bins))
        self.bias = nn.Parameter(torch.zeros(channels, slice_bins))

    def along_slices(self, p: torch.Tensor, n: int) -> torch.Tensor:
        return F.interpolate(p[None], size=n, mode="linear", align_corners=True)[0][None, :, :, None, None]

    def forward(self, h):
        dtype, (d, y, x) = h.dtype, h.shape[2:]
        spectrum = torch.fft.fftn(h.float(), dim=(2, 3, 4))  # cuFFT in half precision only takes powers of 2
        in_plane_mean = torch.zeros(y, x, device=h.device)
        in_plane_mean[0, 0] = y * x
        spectrum = spectrum * self.along_slices(self.weight, d) + self.along_slices(self.bias, d) * in_plane_mean
        return torch.fft.ifftn(spectrum, dim=(2, 3, 4)).abs().to(dtype)


class MedAdapterBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, previous_hidden: int, kernel_sizes, slice_bins: int):
        super().__init__()
        self.down = nn.Conv3d(channels, hidden, 1)
        self.local = nn.ModuleList(
            nn.Sequential(nn.Conv3d(hidden, hidden, (1, k, k), padding=(0, k // 2, k // 2), groups=hidden),
                          nn.Conv3d(hidden, hidden, (k, 1, 1), padding=(k // 2, 0, 0), groups=hidden))
            for k in kernel_sizes)
        self.glob = SliceFilter(hidden, slice_bins)
        self.interaction = nn.Conv3d(previous_hidden, hidden, 1) if previous_hidden else None
        self.mix = nn.Conv3d(hidden, hidden, 1)
        self.up = nn.Conv3d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # Set by med_adapter_block: the previous stage's adapter (not a submodule), and whether a next one reads ours.
        self.previous = None
        self.feeds_next = False
        self.features = None

    def forward(self, y):
        h = F.gelu(self.down(y))
        out = self.glob(h) + sum(branch(h) for branch in self.local)
        if self.interaction is not None and self.previous[0].features is not None:
            earlier = self.previous[0].features
            self.previous[0].features = None
            out = out + self.interaction(F.adaptive_avg_pool3d(earlier, h.shape[2:]))
        if self.feeds_next:
            self.features = h
        return y + self.up(self.mix(out))


class MedAdapter(nn.Module):
    def forward(self, x):
        return getattr(self, BRANCH)(super().forward(x))


def sites(network: nn.Module, a) -> list:
    if a.transformer:
        raise InputError(f"The Med-Adapter goes after the conv stages of a U-Net encoder; {a.architecture} "
                         f"has a transformer encoder: use LoRA or AdaptFormer for it.")
    if any(conv_geometry(network.get_submodule(s))[0] is not nn.Conv3d for s in a.encoder_stages):
        raise InputError("The Med-Adapter factorises its convolutions in-plane and through-plane and "
                         "needs a 3D network; use a 3d configuration, or another method for 2d.")
    return a.encoder_stages


def med_adapter_block(site: Site, *, reduction: int, kernel_sizes, slice_bins: int) -> dict:
    _, _, channels, _ = conv_geometry(site.module)
    hidden = max(channels // reduction, min(channels, 8))
    previous = site.previous[BRANCH] if site.previous else None
    adapter = MedAdapterBlock(channels, hidden, previous.down.out_channels if previous else 0,
                              kernel_sizes, slice_bins)
    if previous is not None:
        adapter.previous = (previous,)  # a tuple: not registered as a submodule a second time
        previous.feeds_next = True
    return {BRANCH: adapter}


METHOD = Method(sites, MedAdapter, med_adapter_block)
