"""Pure-PyTorch RoIAlign and RoIPool: the oracle of the tests and the fallback without C++.

Shapes: N images, C channels, an H x W feature map, K RoIs, PH x PW output bins per RoI.

    input  [N, C, H, W]   feature map
    rois   [K, 5]         rows (batch_index, x1, y1, x2, y2) in input-image coordinates, the
                          dtype and device of `input`; `spatial_scale` maps them onto the map
    output [K, C, PH, PW]

The formulas are those of torchvision's CPU kernels and of csrc/ops/roi_geometry.h, evaluated
in the same order, so that float64 forward results agree to the last bit (float32 within its
rounding). Arithmetic runs in the input dtype, in float32 for float16 and bfloat16 inputs.

Invalid RoIs follow the contract of roi_geometry.h: a batch index that is not an integer in
[0, N) raises IndexError before any work; a RoI with a non-finite coordinate (after scaling)
gives all-zero output (argmax -1) and no gradient. No NaN reaches the gradient of the input:
the coordinates of invalid RoIs, and of samples that do not count, are replaced by 0 before
any arithmetic, so autograd never multiplies by a NaN weight.

Everything is vectorised over RoIs, bins, samples and channels. RoIs are processed in chunks
of similar-sized RoIs, padded to the largest grid or window in the chunk, so that no
intermediate holds much more than MAX_CHUNK_ELEMENTS elements (a single RoI is never split,
but its rows of samples are taken in blocks that fit). The map is read once as a
channels-last [N * H * W, C] table, from which rows are gathered.

RoIAlign visits only the samples that can reach the map, as the kernels do (sample_run in
roi_geometry.h): along each axis the samples of a bin inside [-1, size] form one run, found
by bisection on the sample coordinates, so time and memory stay bounded for any finite box;
the samples left out add exactly nothing to a bin's sum and still count in its divisor.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# Upper bound on the elements of the largest intermediate of one chunk of RoIs.
MAX_CHUNK_ELEMENTS = 2**26
# Cap on the adaptive sampling grid along one side of a bin (kMaxSamplingGrid in C++).
MAX_SAMPLING_GRID = 2**20
# -FLT_MAX: RoIPool's starting maximum for every dtype; values not above it never win.
LOWEST = torch.finfo(torch.float32).min


def roi_align_reference(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign: each bin is the mean of a grid of bilinear samples of the map.

    Args:
        input: [N, C, H, W] feature map (floating point).
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2), same dtype and device as `input`.
        spatial_scale: factor from RoI coordinates to feature-map coordinates.
        pooled_height, pooled_width: PH, PW, both positive.
        sampling_ratio: samples per bin along each side; <= 0 means ceil(bin size) per RoI.
        aligned: shift the box by -0.5 pixel (pixel centres); if False, boxes are at least
            1 x 1.

    Returns:
        [K, C, PH, PW] in the dtype of `input`, differentiable w.r.t. `input`.

    Raises:
        IndexError: a RoI's batch index is not an integer in [0, N).
    """
    images = _image_indices("roi_align", rois, input.shape[0])
    _, channels, height, width = input.shape
    shape = (rois.shape[0], channels, pooled_height, pooled_width)
    if rois.shape[0] * channels * height * width == 0:
        return _zeros(input, shape)
    dtype = _compute_dtype(input.dtype)
    offset = 0.5 if aligned else 0.0
    boxes, valid = _finite_boxes(rois[:, 1:].to(dtype) * spatial_scale - offset)
    x1, y1, x2, y2 = boxes.unbind(1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy: malformed RoIs are forced to be at least 1 x 1
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    grid_h = _sampling_grid(bin_h, sampling_ratio, valid)
    grid_w = _sampling_grid(bin_w, sampling_ratio, valid)
    count = (grid_h * grid_w).clamp(min=1).to(dtype)
    rows = _sample_runs(y1, bin_h, grid_h, pooled_height, height)
    cols = _sample_runs(x1, bin_w, grid_w, pooled_width, width)
    geometry = _AlignGeometry(images, y1, x1, bin_h, bin_w, grid_h, grid_w, count, *rows, *cols)
    table = _channels_last_table(input, dtype, fill=0.0)
    extent_h, extent_w = (rows[1] - rows[0]).amax(dim=1), (cols[1] - cols[0]).amax(dim=1)
    chunks = list(_chunks(extent_h, extent_w, channels * pooled_height * pooled_width))
    parts = [
        _align_chunk(table, geometry.select(chunk), pooled_height, pooled_width, height, width)
        for chunk in chunks
    ]
    return _in_roi_order(parts, chunks).to(input.dtype)


def roi_pool_reference(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
) -> tuple[Tensor, Tensor]:
    """RoIPool: each bin is the maximum over a window of whole map cells.

    Args:
        input: [N, C, H, W] feature map (floating point).
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2), same dtype and device as `input`.
        spatial_scale: factor from RoI coordinates to feature-map coordinates.
        pooled_height, pooled_width: PH, PW, both positive.

    Returns:
        output: [K, C, PH, PW] in the dtype of `input`; 0 for an empty window, -FLT_MAX
            for a window whose values are all NaN or <= -FLT_MAX. The gradient w.r.t.
            `input` flows only to the argmax cell.
        argmax: [K, C, PH, PW] int32, the flat index h * W + w of the winning cell in its
            H x W plane (the first maximum in row-major order), -1 when no cell wins.

    Raises:
        IndexError: a RoI's batch index is not an integer in [0, N).
    """
    images = _image_indices("roi_pool", rois, input.shape[0])
    _, channels, height, width = input.shape
    shape = (rois.shape[0], channels, pooled_height, pooled_width)
    no_winner = torch.full(shape, -1, dtype=torch.int32, device=input.device)
    if rois.shape[0] * channels * height * width == 0:
        return _zeros(input, shape), no_winner
    dtype = _compute_dtype(input.dtype)
    boxes, valid = _finite_boxes(_round_half_away(rois[:, 1:].to(dtype) * spatial_scale))
    x1, y1, x2, y2 = boxes.unbind(1)
    # Malformed RoIs are forced to be at least one cell.
    roi_w, roi_h = (x2 - x1 + 1).clamp(min=1), (y2 - y1 + 1).clamp(min=1)
    h0, h1 = _pool_windows(y1, roi_h / pooled_height, pooled_height, height, valid)
    w0, w1 = _pool_windows(x1, roi_w / pooled_width, pooled_width, width, valid)
    windows = _PoolWindows(images, h0, h1, w0, w1)
    table = _channels_last_table(input, dtype, fill=float("-inf"))
    unit = channels * pooled_height * pooled_width
    chunks = list(_chunks((h1 - h0).amax(dim=1), (w1 - w0).amax(dim=1), unit))
    results = [_pool_chunk(table, windows.select(chunk), height, width) for chunk in chunks]
    output = _in_roi_order([output for output, _ in results], chunks)
    return output.to(input.dtype), _in_roi_order([argmax for _, argmax in results], chunks)


def _image_indices(op: str, rois: Tensor, batch_size: int) -> Tensor:
    """[K] int64 batch indices of `rois` [K, 5]; raises IndexError unless all lie in [0, N)."""
    value = rois[:, 0].to(torch.float64)  # exact for every floating dtype
    ok = (value >= 0) & (value < batch_size) & (value == value.trunc())  # False for NaN
    if not bool(ok.all()):
        k = int((~ok).nonzero()[0, 0])
        raise IndexError(
            f"{op}: RoI {k} has batch index {float(value[k]):g}, "
            f"which is not an integer in [0, {batch_size})"
        )
    return value.long()


def _zeros(input: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zeros of `shape` that autograd still sees as a function of `input` (zero gradient)."""
    return input.new_zeros(shape) + input.reshape(-1)[:0].sum()  # a sum of nothing: exactly 0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype: float32 for float16 and bfloat16, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _finite_boxes(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """boxes [K, 4] -> (boxes with the rows holding a NaN or inf set to 0, valid [K] bool)."""
    valid = torch.isfinite(boxes).all(dim=1)
    return torch.where(valid[:, None], boxes, 0), valid


def _channels_last_table(input: Tensor, dtype: torch.dtype, fill: float) -> Tensor:
    """input [N, C, H, W] -> [N * H * W + 1, C] in `dtype`.

    Row (b * H + h) * W + w holds cell (h, w) of image b; the last row holds `fill` and is
    read in place of the samples or cells that do not count.
    """
    cells = input.to(dtype).permute(0, 2, 3, 1).reshape(-1, input.shape[1])
    return torch.cat([cells, cells.new_full((1, cells.shape[1]), fill)])


def _chunks(extent_h: Tensor, extent_w: Tensor, unit: int) -> Iterator[Tensor]:
    """Groups the K RoIs into chunks whose padded work fits MAX_CHUNK_ELEMENTS.

    extent_h, extent_w [K]: what one RoI needs along the two padded axes (at least 1 is
    counted). A chunk of n RoIs costs n * max(extent_h) * max(extent_w) * unit elements; it
    holds at least one RoI, so a single huge RoI may exceed the bound on its own. RoIs are
    taken in order of their larger extent, so that RoIs of similar size share a chunk and
    little of it is padding. Yields the [k] int64 indices of the RoIs of each chunk.
    """
    # Costs in float64 on the CPU: no integer overflow, and no device round trip per chunk.
    extents = torch.stack([extent_h, extent_w]).clamp(min=1).to("cpu", torch.float64)
    order = torch.argsort(extents.amax(dim=0), stable=True)
    extents = extents[:, order]
    start, total = 0, extents.shape[1]
    while start < total:
        widest = extents[:, start:].cummax(dim=1).values
        count = torch.arange(1, total - start + 1, dtype=torch.float64)
        cost = count * widest[0] * widest[1] * unit  # nondecreasing
        stop = start + max(int(torch.searchsorted(cost, MAX_CHUNK_ELEMENTS, right=True)), 1)
        yield order[start:stop].to(extent_h.device)
        start = stop


def _in_roi_order(parts: list[Tensor], chunks: list[Tensor]) -> Tensor:
    """Concatenates the [k, ...] results of the chunks into [K, ...] in RoI order."""
    return torch.cat(parts)[torch.argsort(torch.cat(chunks))]


# ---------------------------------------------------------------------------------------
# RoIAlign


class _AlignGeometry(NamedTuple):
    """Per-RoI geometry, every field [K]."""

    images: Tensor  # int64 batch index
    start_y: Tensor  # top-left corner of the RoI on the map
    start_x: Tensor
    bin_h: Tensor  # size of one bin
    bin_w: Tensor
    grid_h: Tensor  # int64 samples per bin along each side, 0 for an invalid RoI
    grid_w: Tensor
    count: Tensor  # max(grid_h * grid_w, 1): the divisor of a bin's sum
    rows_first: Tensor  # [K, PH] int64: bin ph visits sample rows [first, last)
    rows_last: Tensor
    cols_first: Tensor  # [K, PW] int64: bin pw visits sample columns [first, last)
    cols_last: Tensor

    def select(self, rois: Tensor) -> "_AlignGeometry":
        """The geometry of the RoIs with indices `rois` [k]."""
        return _AlignGeometry(*(field[rois] for field in self))


def _sampling_grid(bin_size: Tensor, sampling_ratio: int, valid: Tensor) -> Tensor:
    """[K] int64 samples per bin along one side: sampling_ratio if positive, else
    ceil(bin_size) clamped to [0, MAX_SAMPLING_GRID]; 0 for invalid RoIs."""
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, sampling_ratio, dtype=torch.int64)
    else:
        grid = torch.where(bin_size > 0, bin_size.clamp(max=MAX_SAMPLING_GRID).ceil(), 0).long()
    return torch.where(valid, grid, 0)


def _sample_runs(
    start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int
) -> tuple[Tensor, Tensor]:
    """The runs of samples of each bin along one axis whose coordinate lies in [-1, size].

    start, bin_size [K] (arithmetic dtype), grid [K] int64 -> (first, last) [K, P] int64:
    bin p visits samples [first, last) of its grid. The coordinate of a bin's samples is
    monotone in the sample index (decreasing for an inverted aligned box), so the run is
    found by bisection, as sample_run in roi_geometry.h does, on the same expression.
    """
    start, bin_size, grid = start[:, None], bin_size[:, None], grid[:, None]
    bins = torch.arange(pooled, device=start.device, dtype=start.dtype)  # [P]
    decreasing = bin_size < 0

    def coord(i: Tensor) -> Tensor:  # [K, P] int64 -> [K, P]
        return _sample_coord(start, bins, bin_size, i, grid)

    def before(i: Tensor) -> Tensor:  # samples ahead of the run; NaN counts as ahead
        c = coord(i)
        return torch.where(decreasing, c > size, ~(c >= -1))

    def within(i: Tensor) -> Tensor:  # from the run's first sample on: still in the run
        c = coord(i)
        return torch.where(decreasing, c >= -1, c <= size)

    zero = torch.zeros(len(start), pooled, dtype=torch.int64, device=start.device)
    end = grid.expand_as(zero)
    steps = int(grid.max()).bit_length()
    first = _partition_point(before, zero, end, steps)
    return first, _partition_point(within, first, end, steps)


def _partition_point(
    pred: Callable[[Tensor], Tensor], begin: Tensor, end: Tensor, steps: int
) -> Tensor:
    """Elementwise first i in [begin, end) with pred(i) false, pred being true on a prefix;
    `steps` = (largest end - begin).bit_length() halvings suffice."""
    for _ in range(steps):
        active = begin < end
        mid = (begin + end) // 2
        ahead = pred(mid)
        begin = torch.where(active & ahead, mid + 1, begin)
        end = torch.where(active & ~ahead, mid, end)
    return begin


def _sample_coord(start: Tensor, bins: Tensor, bin_size: Tensor, i: Tensor, grid: Tensor) -> Tensor:
    """Coordinate of sample i of bin `bins`, in the kernels' order of operations (i + 0.5
    is exact in the arithmetic dtype for i < 2**23, as it is in their float arithmetic)."""
    dtype = start.dtype
    return start + bins * bin_size + (i.to(dtype) + 0.5) * bin_size / grid.to(dtype)


def _align_chunk(
    table: Tensor, g: _AlignGeometry, pooled_h: int, pooled_w: int, height: int, width: int
) -> Tensor:
    """RoIAlign of a chunk of k RoIs: table [N * H * W + 1, C] -> [k, C, PH, PW].

    Samples are laid out [k, PH, PW, GH, GW] (GH x GW the longest runs in the chunk); the
    y terms vary along (PH, GH), the x terms along (PW, GW). Rows of samples are taken in
    blocks of at most MAX_CHUNK_ELEMENTS elements, each block's sums carried to the next.
    """
    x_taps = _axis_taps(g.start_x, g.bin_w, g.grid_w, g.cols_first, g.cols_last, width)
    y_taps = _axis_taps(g.start_y, g.bin_h, g.grid_h, g.rows_first, g.rows_last, height)
    k, gh, gw, channels = len(g.images), y_taps[0].shape[2], x_taps[0].shape[2], table.shape[1]
    block = max(MAX_CHUNK_ELEMENTS // (k * pooled_h * pooled_w * gw * channels), 1)
    sums = None
    for first in range(0, gh, block):
        rows = [t[:, :, first : first + block] for t in y_taps]
        samples = _align_samples(table, g.images, rows, x_taps, height, width)
        samples = samples.flatten(3, 4)  # [k, PH, PW, block * GW, C] in (iy, ix) order
        if sums is not None:
            samples = torch.cat([sums, samples], dim=3)
        # cumsum adds the samples one after another in (iy, ix) order, as the kernels'
        # loop does (sum() pairs them differently): its last entry is the bin's sum, bit
        # for bit, and the carry into the next block of rows.
        sums = samples.cumsum(dim=3)[:, :, :, -1:]
    return (sums[:, :, :, 0] / g.count[:, None, None, None]).permute(0, 3, 1, 2)


def _align_samples(
    table: Tensor,
    images: Tensor,
    y_taps: Sequence[Tensor],
    x_taps: Sequence[Tensor],
    height: int,
    width: int,
) -> Tensor:
    """Bilinear samples [k, PH, PW, GH, GW, C] of the rows of taps y_taps [k, PH, GH] and
    the columns x_taps [k, PW, GW] (each (low, high, w_low, w_high, inside))."""
    y_low, y_high, hy, ly, y_in = y_taps
    x_low, x_high, hx, lx, x_in = x_taps

    def along_y(t: Tensor) -> Tensor:  # [k, PH, GH] -> [k, PH, 1, GH, 1]
        return t[:, :, None, :, None]

    def along_x(t: Tensor) -> Tensor:  # [k, PW, GW] -> [k, 1, PW, 1, GW]
        return t[:, None, :, None, :]

    first_row = images[:, None, None] * height
    inside = along_y(y_in) & along_x(x_in)
    zero_row = table.shape[0] - 1

    def tap(y: Tensor, x: Tensor, wy: Tensor, wx: Tensor) -> Tensor:  # [k, PH, PW, GH, GW, C]
        rows = torch.where(inside, along_y((first_row + y) * width) + along_x(x), zero_row)
        return (along_y(wy) * along_x(wx))[..., None] * table[rows]

    # Same order as the kernels: w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4. A sample that does
    # not count reads the zero row with finite weights, so it adds exactly 0.
    return (
        tap(y_low, x_low, hy, hx)
        + tap(y_low, x_high, hy, lx)
        + tap(y_high, x_low, ly, hx)
        + tap(y_high, x_high, ly, lx)
    )


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, first: Tensor, last: Tensor, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for the sample runs of a chunk of k RoIs.

    start, bin_size [k] (arithmetic dtype), grid [k] int64, first, last [k, P] int64 (the
    runs) -> (low, high, w_low, w_high, inside), each [k, P, G] with G the longest run (at
    least 1): the two cells each sample reads, their weights, and whether the sample counts
    (inside [-1, size] and not padding).
    """
    dtype = start.dtype
    pooled = first.shape[1]
    bins = torch.arange(pooled, device=start.device, dtype=dtype)[:, None]  # [P, 1]
    longest = max(int((last - first).max()), 1)
    steps = first[..., None] + torch.arange(longest, device=start.device)  # [k, P, G]
    start, bin_size, grid = start[:, None, None], bin_size[:, None, None], grid[:, None, None]
    coord = _sample_coord(start, bins, bin_size, steps, grid)
    inside = (steps < last[..., None]) & (coord >= -1) & (coord <= size)
    # Samples that do not count get coordinate 0, hence finite weights (autograd multiplies
    # by them); this also clamps the others to >= 0.
    coord = torch.where(inside & (coord > 0), coord, 0)
    low = coord.long()  # truncation is floor here: coord >= 0
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, low, low + 1)
    coord = torch.where(edge, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    return low, high, 1 - frac, frac, inside


# ---------------------------------------------------------------------------------------
# RoIPool


class _PoolWindows(NamedTuple):
    """Per-RoI windows: images [K] int64; h0, h1 [K, PH] and w0, w1 [K, PW] int64, bin
    (ph, pw) covering rows [h0, h1) and columns [w0, w1) of the map."""

    images: Tensor
    h0: Tensor
    h1: Tensor
    w0: Tensor
    w1: Tensor

    def select(self, rois: Tensor) -> "_PoolWindows":
        """The windows of the RoIs with indices `rois` [k]."""
        return _PoolWindows(*(field[rois] for field in self))


def _round_half_away(v: Tensor) -> Tensor:
    """C's round(): halves go away from zero (torch.round goes to even)."""
    whole = v.trunc()
    return torch.where((v - whole).abs() >= 0.5, whole + v.sign(), whole)


def _pool_windows(
    start: Tensor, bin_size: Tensor, pooled: int, size: int, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Windows along one axis: start, bin_size [K] -> (first, stop) [K, P] int64.

    Bin p covers cells [floor(p * bin) + start, ceil((p + 1) * bin) + start) clipped to
    [0, size]; the windows of invalid RoIs are empty.
    """
    bins = torch.arange(pooled, device=start.device, dtype=start.dtype)
    start, bin_size = start[:, None], bin_size[:, None]
    first = ((bins * bin_size).floor() + start).clamp(0, size).long()
    stop = (((bins + 1) * bin_size).ceil() + start).clamp(0, size).long()
    return first, torch.where(valid[:, None], stop, first)


def _pool_chunk(table: Tensor, win: _PoolWindows, height: int, width: int) -> tuple[Tensor, Tensor]:
    """RoIPool of a chunk of k RoIs: table [N * H * W + 1, C] -> (output, argmax), each
    [k, C, PH, PW].

    Window cells are laid out [k, PH, PW, EH * EW] in row-major order, padded to the
    largest window (EH x EW) in the chunk.
    """
    rows, row_in = _window_cells(win.h0, win.h1)  # [k, PH, EH]
    cols, col_in = _window_cells(win.w0, win.w1)  # [k, PW, EW]
    k, ph, eh = rows.shape
    pw, ew = cols.shape[1:]
    cells = (rows * width)[:, :, None, :, None] + cols[:, None, :, None, :]
    cells = cells.reshape(k, ph, pw, eh * ew)
    inside = (row_in[:, :, None, :, None] & col_in[:, None, :, None, :]).reshape(cells.shape)
    plane = (win.images * (height * width))[:, None, None, None]
    values = table[torch.where(inside, plane + cells, table.shape[0] - 1)]  # [..., C]
    # Cells outside the window read -inf; they, NaN and values <= -FLT_MAX never win, so
    # they become -inf. torch.argmax returns the first maximum: the kernels' strict '>'
    # scan in row-major order.
    candidates = values.detach().masked_fill(~(values > LOWEST), float("-inf"))
    best = candidates.argmax(dim=3, keepdim=True)  # [k, PH, PW, 1, C]
    won = candidates.gather(3, best).squeeze(3) > LOWEST
    cell = cells[..., None].expand(candidates.shape).gather(3, best).squeeze(3)
    argmax = torch.where(won, cell, -1).to(torch.int32)
    empty = ((win.h1 <= win.h0)[:, :, None] | (win.w1 <= win.w0)[:, None, :])[..., None]
    # Gathering the winner's value sends its gradient to exactly that cell, even for ties.
    output = torch.where(won, values.gather(3, best).squeeze(3), torch.where(empty, 0, LOWEST))
    return output.permute(0, 3, 1, 2), argmax.permute(0, 3, 1, 2)


def _window_cells(first: Tensor, stop: Tensor) -> tuple[Tensor, Tensor]:
    """first, stop [k, P] -> (cells, inside) [k, P, E] with E = max(stop - first, 1): the
    indices first, first + 1, ... of each window and which of them are in it."""
    steps = torch.arange(max(int((stop - first).max()), 1), device=first.device)
    cells = first[..., None] + steps
    return cells, cells < stop[..., None]
