"""What a PCIe link can carry, from its generation and width (as NVML reports them)."""

# Per PCIe generation: each lane's signalling rate (GT/s) and the share of its bits that is data after the
# line code (8b/10b, then 128b/130b; 6.0 sends FEC-protected flits with no line code).
PCIE_LANES = {1: (2.5, 8 / 10), 2: (5.0, 8 / 10), 3: (8.0, 128 / 130), 4: (16.0, 128 / 130), 5: (32.0, 128 / 130),
              6: (64.0, 1.0)}
PCIE_CEILING = (6, 16)  # the link assumed where NVML does not say: PCIe 6.0 x16, faster than any GPU's today


def lane_bytes_per_s(generation: int) -> float | None:
    """One lane's one-way data rate in bytes/s; None for a generation PCIE_LANES does not know."""
    if generation not in PCIE_LANES:
        return None
    gigatransfers, data_share = PCIE_LANES[generation]
    return gigatransfers * 1e9 * data_share / 8


def pcie_peak_bytes_per_s(generation: int | None, width: int | None) -> float:
    """One direction's raw rate of a PCIe link in bytes/s: lanes x GT/s x the line code's data share / 8 bits
    (5.0 x16: 63.0e9). A generation or width NVML did not give, or a generation PCIE_LANES does not know, is
    taken as PCIE_CEILING, so that a bound made of it errs high."""
    if generation not in PCIE_LANES or not width:
        generation, width = PCIE_CEILING
    return width * lane_bytes_per_s(generation)
