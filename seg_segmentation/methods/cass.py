"""CASS (Kim et al., CVPR 2025): a DINO attention graph distilled into CLIP's last block, and text adjusted per image
towards the objects present (design.md §13.5).

    method = CASS(clip, vfm=dino)                  # modules.clip.CLIP + a DINO ViT (modules.vfm) of CLIP's width
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p, w/p, D]

The last block keeps only its attention (no residual, no MLP, NACLIP's "reduced" block), and its attention matrix
is built per head from keys alone: CLIP's key-key map A = k kᵀ·s is mixed with a low-rank copy of DINO's key-key
graph G, each CLIP head taking the DINO head whose eigenvalue spectrum the Hungarian matching pairs it with, plus
NACLIP's Gaussian neighbourhood Ω:  softmax_row((10w·M̂ + A)/(10w + 1) + Ω). Then, per window, the query of each
cluster of similar queries that the global embedding favours is pulled towards the mean of its two best-matching
patches, and the logits mix patch and global similarities.
"""
import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UsageError
from .base import Knob, Queries, TrainingFreeMethod, pad_or_cut
from .naclip import neighbourhood_bias

# CASS turns the CLIP-normalised window back into pixels with ImageNet's statistics - and 0.255 for 0.225 -, the
# two constants of its torchvision Normalize; then DINO's own preprocessing normalises with the right ones.
UNDO_MEAN = (-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255)
UNDO_STD = (1 / 0.229, 1 / 0.224, 1 / 0.255)
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- DINO's input and keys
def dino_pixels(crops: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised windows [B, 3, h, w] -> the uint8 images CASS gives DINO [B, S, S, 3], S = min(h, w): a
    float32 undo with the wrong statistics, x255, truncated (clamped first: real pixels never leave 0..255, where
    CASS's numpy cast would wrap around), then squashed to a square by PIL's bicubic resize."""
    mean = crops.new_tensor(UNDO_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = crops.new_tensor(UNDO_STD, dtype=torch.float32).view(3, 1, 1)
    pixels = ((crops.float() - mean) / std * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    h, w = crops.shape[-2:]
    if h == w:
        return pixels
    squashed = [np.asarray(Image.fromarray(p).resize((min(h, w),) * 2, Image.Resampling.BICUBIC))
                for p in pixels.cpu().numpy()]
    return torch.from_numpy(np.stack(squashed)).to(crops.device)


def dino_images(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 images [B, S, S, 3] -> DINO's input [B, 3, S', S'] float32 (S' = S cut to a multiple of the patch)."""
    x = pixels.permute(0, 3, 1, 2).float().div(255)
    x = (x - x.new_tensor(DINO_MEAN).view(3, 1, 1)) / x.new_tensor(DINO_STD).view(3, 1, 1)
    side = x.shape[-1] - x.shape[-1] % patch
    return x[..., :side, :side]


def keys_on_clip_grid(dino_keys: torch.Tensor, heads: int, grid: Tuple[int, int]) -> torch.Tensor:
    """DINO's last-block patch keys [B, Hd, N, d] (no class token; N = g²) -> fp16 grids on CLIP's patch grid
    [B, H, hd, gh·gw], channel first: CASS halves the keys and resizes them bilinearly in fp16. DINO's channels are
    read as CLIP's (heads, head_dim) - same width, so head h of one is head h of the other for ViT-B/8 + B/16."""
    B, _, N, _ = dino_keys.shape
    g = math.isqrt(N)
    k = dino_keys.half().transpose(-1, -2).reshape(B * heads, -1, g, g).contiguous()   # [B·H, hd, g, g]
    # contiguous in and out, whatever layout the keys came in: the fp16 graph product downstream depends on it
    k = F.interpolate(k, size=grid, mode='bilinear', align_corners=False).contiguous()
    return k.reshape(B, heads, -1, grid[0] * grid[1])


def match_key_range(dino_k: torch.Tensor, clip_k: torch.Tensor) -> torch.Tensor:
    """Min-max map each window's fp16 DINO keys [B, H, hd, n] onto the value range of its CLIP patch keys
    [B, H, n, hd] (all heads together), as CASS's mixed-dtype expression evaluates on a CPU: the shift and the
    division in fp16, the product with the float32 range before rounding, then + the fp16-rounded minimum."""
    lo, hi = dino_k.amin(dim=(1, 2, 3), keepdim=True), dino_k.amax(dim=(1, 2, 3), keepdim=True)
    kmin, kmax = clip_k.amin(dim=(1, 2, 3), keepdim=True), clip_k.amax(dim=(1, 2, 3), keepdim=True)
    unit = (dino_k - lo) / (hi - lo)                                                  # fp16
    return (unit.float() * (kmax - kmin).float()).half() + kmin.float().half()


def key_graph(keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Channel-first keys [..., hd, n] -> key-key graph kᵀk·scale [..., n, n] in the keys' dtype. The CPU fp16
    product depends on the operands' memory layout; this one (a transposed view times the contiguous grid) is
    CASS's."""
    keys = keys.contiguous()
    return (keys.transpose(-1, -2) @ keys) * scale


# ---------------------------------------------------------------------- spectral matching and distillation
def spectrum(adj: torch.Tensor, k: int) -> torch.Tensor:
    """[H, n, n] -> the k largest eigenvalues of each head's graph, descending, [H, k] float64."""
    return torch.linalg.eigvalsh(adj.double()).sort(dim=-1, descending=True).values[:, :k]


def spectral_cost(eig_dino: torch.Tensor, eig_clip: torch.Tensor) -> torch.Tensor:
    """Spectra [H, k] (DINO, CLIP) -> cost [H, H] float32: 1 - the L1 distance between the sorted spectra, each
    L2- then L1-normalised (divisions, as CASS: rounding here decides tied assignments)."""
    d = F.normalize(F.normalize(eig_dino, dim=1), p=1, dim=1).sort(dim=1).values
    c = F.normalize(F.normalize(eig_clip, dim=1), p=1, dim=1).sort(dim=1).values
    return (1 - (d[:, None] - c[None]).abs().sum(dim=-1)).float()


def low_rank(adj: torch.Tensor, q: int, generator: torch.Generator, niter: int = 2):
    """Halko et al.'s randomised SVD as torch.svd_lowrank computes it for a square float64 [n, n], with the Gaussian
    test matrix drawn from ``generator`` -> U [n, q], S [q], V [n, q]."""
    R = torch.randn(adj.shape[-1], q, dtype=torch.float64, generator=generator).to(adj.device)
    Q = torch.linalg.qr(adj @ R).Q
    for _ in range(niter):
        Q = torch.linalg.qr(adj.mH @ Q).Q
        Q = torch.linalg.qr(adj @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ adj, full_matrices=False)
    return Q @ U, S, Vh.mH


def stretch_singular_values(s: torch.Tensor) -> torch.Tensor:
    """CASS's eigen-scaling: [s_min, s_max] mapped affinely onto [s_min/2, 1.5·s_max]."""
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo


def to_range(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Min-max map float64 x onto the value range of float32 ``like`` (whose span is computed in float32)."""
    lo, hi = like.min(), like.max()
    return (x - x.min()) / (x.max() - x.min()) * (hi - lo).double() + lo.double()


def distill(attn: torch.Tensor, graph: torch.Tensor, generator: torch.Generator, k_eigen: int = 20, rank: int = 10,
            scale_factor: float = 10.0, eigen_scaling: bool = True):
    """One window: CLIP's key maps A [H, n, n] float32 and DINO's graphs G [H, n, n] -> combined maps [H, n, n]
    float32, the DINO head each CLIP head takes σ [H], the spectral cost [H, H].

    Heads are paired by the Hungarian assignment σ minimising the spectral cost (which pairs *dissimilar* spectra).
    CLIP head idx then takes G_σ(idx), weighted by w = 1 - cost[idx, σ(idx)]: the score of DINO head idx with CLIP
    head σ(idx), not of the fused pair - CASS's indexing, kept. One Gaussian draw per head, in head order."""
    from scipy.optimize import linear_sum_assignment
    cost = spectral_cost(spectrum(graph, k_eigen), spectrum(attn, k_eigen))
    sigma = torch.from_numpy(linear_sum_assignment(cost.cpu().numpy())[1])
    out = torch.empty_like(attn)
    for idx, j in enumerate(sigma.tolist()):
        U, S, V = low_rank(graph[j].double(), min(rank, graph.shape[-1]), generator)
        if eigen_scaling:
            S = stretch_singular_values(S)
        M = (U @ torch.diag(S)) @ V.T
        M.fill_diagonal_(0)            # before the range map, so the diagonal lands at the low end of A's range
        w = (1 - cost[idx, j]) * scale_factor                                         # float32
        out[idx] = ((w.double() * to_range(M, attn[idx]) + attn[idx]) / (w + 1).double()).float()
    return out, sigma, cost


# ---------------------------------------------------------------------- text side
def cluster_queries(features: torch.Tensor, threshold: float) -> np.ndarray:
    """Query features [Q, D] -> cluster of each query [Q] (0-based): Ward linkage on cosine distances, cut at
    ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    if len(features) < 2:
        return np.zeros(len(features), dtype=np.int64)
    f = F.normalize(features.double(), dim=-1).cpu()
    dist = (1 - f @ f.T).clamp(0, 2)
    rows, cols = torch.triu_indices(len(f), len(f), offset=1)                         # scipy's condensed order
    return fcluster(linkage(dist[rows, cols].numpy(), method='ward'), t=threshold, criterion='distance') - 1


def object_presence(feats: torch.Tensor, sims: torch.Tensor, text: torch.Tensor, clusters: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """Per window, each cluster's query that the global embedding favours moves towards its objects.

    feats [B, n, D] (L2-normalised patches), sims [B, Q] (global embedding · queries), text [Q, D], clusters [Q]
    -> adjusted queries [B, Q, D]: for cluster c, q* = its query of highest sim (first on ties), m = the
    normalised mean of the 2 patches closest to q*, and q* <- normalise((1 - α) q* + α m)."""
    C = int(clusters.max()) + 1
    member = clusters[None] == torch.arange(C, device=clusters.device)[:, None]         # [C, Q]
    best = sims[:, None, :].masked_fill(~member, float('-inf')).argmax(dim=-1)        # [B, C]
    t = F.normalize(text[best], dim=-1)                                               # [B, C, D]
    top = (F.normalize(feats, dim=-1) @ t.transpose(1, 2)).topk(min(2, feats.shape[1]), dim=1).indices   # [B, k, C]
    picked = torch.gather(feats[:, :, None].expand(-1, -1, C, -1), 1,
                          top[..., None].expand(-1, -1, -1, feats.shape[-1]))               # [B, k, C, D]
    m = F.normalize(picked.mean(dim=1), dim=-1)
    out = text.expand(len(feats), -1, -1).clone()
    out.scatter_(1, best[..., None].expand(-1, -1, text.shape[-1]), F.normalize((1 - alpha) * t + alpha * m, dim=-1))
    return out


# ---------------------------------------------------------------------- the method
@dataclasses.dataclass
class ImageState:
    """What the windows of one image share."""
    generator: torch.Generator                    # the randomised SVDs' draws, consumed window after window
    image: torch.Tensor                           # [3, H, W], for the whole-image embedding
    embedding: Optional[torch.Tensor] = None      # [D] CLIP's embedding of the whole image, at first need


class Encoded(NamedTuple):
    """encode: CASS's visual side for a batch of windows."""
    dense: torch.Tensor                   # [B, gh, gw, D] patch features
    embedding: Optional[torch.Tensor]     # [B, D] each window's own CLIP embedding (when asked for)
    assignment: torch.Tensor              # [B, H] the DINO head each CLIP head distils
    cost: torch.Tensor                    # [B, H, H] the spectral cost it was chosen on


class Window(NamedTuple):
    """window_outputs: the logits on the patch grid and what they are made from."""
    logits: torch.Tensor        # [B, Q, gh, gw]
    global_sims: torch.Tensor   # [B, Q]  global embedding · queries
    text: torch.Tensor          # [B, Q, D] queries after the object-presence adjustment
    visual: Encoded


class CASS(TrainingFreeMethod):
    name = 'cass'
    year = 2025
    summary = "DINO's key graph distilled into the last block's attention by spectral matching; per-image text"
    paper = ('Kim, Ju, Han, Yang, Hwang, CVPR 2025, "Distilling Spectral Graph for Object-Context Aware '
             'Open-Vocabulary Semantic Segmentation"')
    vfm = 'dino_vitb8'
    knobs = (
        Knob('gaussian_std', float, 5.0, 'σ of the neighbourhood Gaussian added to the attention, in patches'),
        Knob('global_semantics_weight', float, 0.4, 'β: weight of the global embedding\'s similarity in the logits'),
        Knob('mean_vector_weight', float, 0.02, 'α: how far a query moves towards its two best patches'),
        Knob('h_threshold', float, 0.1, 'Ward-linkage height at which similar queries form one cluster'),
        Knob('eigen_scaling', bool, True, "stretch the DINO graph's singular values to [s_min/2, 1.5 s_max]"),
        Knob('global_from', str, 'image', "global embedding: the whole image's, or each window's own",
             choices=('image', 'window')),
        Knob('svd_seed', int, 2105, "seed of each image's randomised-SVD draws"),
        Knob('cass_k_eigen', int, 20, 'eigenvalues compared when matching heads'),
        Knob('cass_rank', int, 10, "rank of the DINO graph's randomised SVD"),
        Knob('cass_scale_factor', float, 10.0, "λ: the DINO graph's weight is λ·w against 1 for CLIP's"),
    )
    # CASS's configs: short side 336 (560 Cityscapes), 224 windows every 112 px (VOC21: the whole image), 80
    # prompts, logit scale 40, no PAMR; β, α and the threshold per dataset, eigen-scaling off for VOC20 and
    # Cityscapes, Cityscapes' global embedding from each window. The knobs' own defaults: CASS's where it has one,
    # else (β, α, threshold: every config sets them) VOC20's, the preset a dataset of your own gets.
    defaults = dict(resolution=336, crop=224, stride=112, logit_scale=40.0, prob_thd=0.0)
    presets = {
        'voc': dict(crop=0, prob_thd=0.1, global_semantics_weight=0.1, mean_vector_weight=0.03, h_threshold=0.1),
        'context': dict(prob_thd=0.1, global_semantics_weight=0.25, mean_vector_weight=0.04, h_threshold=0.09),
        'coco': dict(prob_thd=0.1, global_semantics_weight=0.25, mean_vector_weight=0.01, h_threshold=0.1),
        'voc20': dict(global_semantics_weight=0.4, mean_vector_weight=0.02, h_threshold=0.1, eigen_scaling=False),
        'context59': dict(global_semantics_weight=0.25, mean_vector_weight=0.04, h_threshold=0.09),
        'coco_stuff': dict(global_semantics_weight=0.2, mean_vector_weight=0.02, h_threshold=0.02),
        'cityscapes': dict(resolution=560, global_semantics_weight=0.1, mean_vector_weight=0.03, h_threshold=0.14,
                           eigen_scaling=False, global_from='window'),
        'ade20k': dict(global_semantics_weight=0.3, mean_vector_weight=0.05, h_threshold=0.06),
    }
    published = dict(voc=65.8, context=36.7, coco=37.8, voc20=87.8, context59=40.2, coco_stuff=26.7,
                     cityscapes=39.4, ade20k=20.4)

    def __init__(self, clip, vfm, **knobs):
        super().__init__(clip, **knobs)
        width = clip.visual.transformer.resblocks[-1].attn.width
        if vfm.config.family != 'dino':     # CASS's DINOv2 branch (518 px input, registers) was never published
            raise UsageError(f'cass: the second vision model must be a DINO ViT (--vfm dino_vitb8 or a file of that '
                             f'layout), not {vfm.config.family}')
        if vfm.width != width:
            raise UsageError(f'cass: the second vision model is {vfm.width} wide but CLIP is {width}: CASS reads '
                             f'its keys as CLIP\'s heads (DINO ViT-B/8 with CLIP ViT-B/16)')
        self.vfm_model = vfm       # (the class attribute vfm is the default's name)
        self._clusters = None

    def prepare_image(self, image: torch.Tensor) -> ImageState:
        # a generator per image, seeded alike, so the draws depend neither on batching nor on the process count
        return ImageState(torch.Generator().manual_seed(self.svd_seed), image)

    # ------------------------------------------------------------------ visual side
    def dino_keys(self, crops: torch.Tensor) -> torch.Tensor:
        """Windows [B, 3, h, w] -> DINO's last-block keys [B, Hd, 1 + N, d] on CASS's squashed input."""
        images = dino_images(dino_pixels(crops), self.vfm_model.patch_size)
        return self.vfm_model.last_block_keys(images.to(next(self.vfm_model.parameters()).dtype))

    def encode(self, crops: torch.Tensor, states: Sequence[ImageState], dino_keys: Optional[torch.Tensor] = None,
               own_global: bool = False) -> Encoded:
        """Windows [B, 3, h, w] -> dense features etc. (``Encoded``). DINO sees the whole window (``dino_keys``
        [B, Hd, 1+N, d]: given instead), CLIP the window cut to whole patches."""
        if dino_keys is None:
            dino_keys = self.dino_keys(crops)
        crops, _ = pad_or_cut(crops, self.patch_size)
        grid = (crops.shape[-2] // self.patch_size, crops.shape[-1] // self.patch_size)
        visual = self.clip.visual
        last = visual.transformer.resblocks[-1]
        x = visual.tokens_before_last(crops)                                          # [B, 1+n, W]
        embedding = visual.head(last(x)[:, 0]) if own_global else None
        _, k, v = last.attn.qkv_heads(last.ln_1(x))                                   # [B, H, 1+n, hd]
        k, v = k[:, :, 1:].float(), v[:, :, 1:]
        heads, hd = k.shape[1], k.shape[-1]
        attn = (k @ k.transpose(-1, -2)) * hd ** -0.5                                 # [B, H, n, n] float32
        dino_k = match_key_range(keys_on_clip_grid(dino_keys[:, :, 1:], heads, grid), k)
        graph = key_graph(dino_k, hd ** -0.5)                                         # [B, H, n, n] fp16
        # eigenvalues, matching and the SVD draws: one window at a time
        combined, assignment, cost = zip(*(
            distill(attn[b], graph[b], states[b].generator, self.cass_k_eigen, self.cass_rank,
                    self.cass_scale_factor, self.eigen_scaling) for b in range(len(crops))))
        attn = (torch.stack(combined) + self.omega(grid, crops.device)).softmax(dim=-1)
        dense = visual.head(last.attn.merge_heads(attn.to(v.dtype) @ v))              # [B, n, D]
        return Encoded(dense.unflatten(1, grid), embedding, torch.stack(assignment), torch.stack(cost))

    def omega(self, grid: Tuple[int, int], device) -> torch.Tensor:
        """NACLIP's Gaussian Ω between the patches of the grid (naclip.py; cached there), class token dropped."""
        return neighbourhood_bias(*grid, self.gaussian_std, torch.device(device))[1:, 1:]

    def dense_features(self, crops: torch.Tensor, states: Sequence[Optional[ImageState]]) -> torch.Tensor:
        states = [s if s is not None else self.prepare_image(c) for s, c in zip(states, crops)]
        return self.encode(crops, states).dense

    def image_embedding(self, state: ImageState) -> torch.Tensor:
        """CLIP's (unmodified) embedding of the whole image [D], computed once per image."""
        if state.embedding is None:
            image, _ = pad_or_cut(state.image[None], self.patch_size)
            state.embedding = self.clip.encode_image(image)[0]
        return state.embedding

    # ------------------------------------------------------------------ logits
    def clusters(self, queries: Queries) -> torch.Tensor:
        """The query clusters of this vocabulary [Q] (computed once per vocabulary and threshold)."""
        if self._clusters is None or self._clusters[0] is not queries.features or \
                self._clusters[1] != self.h_threshold:
            labels = torch.as_tensor(cluster_queries(queries.features, self.h_threshold), dtype=torch.long)
            self._clusters = (queries.features, self.h_threshold, labels.to(queries.features.device))
        return self._clusters[2]

    def window_outputs(self, crops: torch.Tensor, queries: Queries, states: Sequence[Optional[ImageState]]) -> Window:
        """Windows [B, 3, h, w] -> their logits on the patch grid, and what went into them (``Window``)."""
        states = [s if s is not None else self.prepare_image(c) for s, c in zip(states, crops)]
        # the window's own embedding where it is asked for, or where the window is the whole image anyway
        own = [self.global_from == 'window' or c.shape[-2:] == s.image.shape[-2:] for c, s in zip(crops, states)]
        enc = self.encode(crops, states, own_global=any(own))
        g = torch.stack([enc.embedding[b] if own[b] else self.image_embedding(s) for b, s in enumerate(states)])
        g = F.normalize(g.float(), dim=-1)                                            # [B, D]
        feats = F.normalize(enc.dense.float().flatten(1, 2), dim=-1)                  # [B, n, D]
        sims = g @ queries.features.T                                                 # [B, Q]
        text = object_presence(feats, sims, queries.features, self.clusters(queries), self.mean_vector_weight)
        beta = self.global_semantics_weight
        logits = (feats @ text.transpose(1, 2)) * (1 - beta) + sims[:, None] * beta   # [B, n, Q]
        return Window(logits.transpose(1, 2).unflatten(2, enc.dense.shape[1:3]), sims, text, enc)

    def window_logits(self, crops: torch.Tensor, queries: Queries, states: Sequence[Optional[ImageState]]):
        """Windows [B, 3, h, w] -> [B, Q, h, w]: the grid logits resized bilinearly over the whole window."""
        logits = self.window_outputs(crops, queries, states).logits
        return F.interpolate(logits, size=crops.shape[-2:], mode='bilinear', align_corners=False)


METHOD = CASS
