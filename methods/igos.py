"""iGOS++ (Khorram et al. 2021, "iGOS++: Integrated Gradient Optimized Saliency by Bilateral
Perturbations", arXiv 2012.15783; reference code github.com/khorrams/IGOS_pp).

Two low-resolution masks (1 = keep the pixel, 0 = perturb it), upsampled bilinearly to the
image, are optimized together:

* the deletion mask ``d`` blends the image into a blurred copy where it is 0: deleting few
  pixels should lower the softmax probability of the target;
* the insertion mask ``i`` blends the blurred copy into the image where it is 0: inserting few
  pixels should raise it;
* both alone and their product ``d * i`` enter the loss, each through an *integrated* score:
  the mean probability over ``ig_iter`` points t/ig_iter * mask (t = 1..ig_iter) of the path
  from the unmasked to the masked image, each point with Gaussian input noise;
* regularizers on ``d * i``: L1 * mean|1 - m| (few perturbed pixels) and L2 * a bilateral total
  variation (smooth masks whose edges follow the image's edges);
* descent with a backtracking (Armijo) line search; masks clipped to [0, 1] after every step.

The map is ``1 - upsample(d * i)`` broadcast over channels: larger means more salient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.base.registry import Range
from methods.common import target_logits
from methods.fold import gradient_model
from methods.registry import METHODS

TERMS = ("deletion", "insertion", "deletion", "insertion")  # combined mask twice, then d, i
TV_BETA = 2  # exponent of the (bilateral) total variation
BILATERAL_SIGMA = 0.01  # image-edge sensitivity of the bilateral weights
ARMIJO_BETA, DECAY, MIN_STEP = 1e-4, 0.2, 1e-5  # line search, as the reference
POSITIVE = Range(0, exclusive_low=True)


# ``alpha`` here is the first step of the line search (not LRP's rule weight); L1 and L2 weigh
# the regularizers; ``noise`` is the sigma of the input noise on the integration path.
@METHODS.register(ranges={"size": Range(1), "L1": Range(0), "L2": Range(0), "ig_iter": Range(1),
                          "iterations": Range(1), "alpha": POSITIVE, "noise": Range(0),
                          "blur_ksize": Range(1), "blur_sigma": POSITIVE})
def igos_pp(model: nn.Module, x: Tensor, target: Tensor, *, size: int = 28, L1: float = 1.0,
            L2: float = 20.0, ig_iter: int = 20, iterations: int = 15, alpha: float = 1000.0,
            noise: float = 0.2, blur_ksize: int = 51, blur_sigma: float = 50.0,
            internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """iGOS++ map 1 - upsample(deletion mask * insertion mask), broadcast over channels.

    Paper settings: masks ``size`` x ``size`` = 28 x 28, L1 = 1, L2 = 20, ig_iter = 20,
    iterations = 15, first line-search step ``alpha`` = 1000, input noise sigma 0.2; the
    baseline is a Gaussian blur of x (kernel ``blur_ksize``, sigma ``blur_sigma``, as the
    reference's cv2 blur of a 224 x 224 image). x: (B, C, H, W) -> (B, C, H, W) in [0, 1].
    """
    masks = igos_pp_masks(model, x, target, size=size, L1=L1, L2=L2, ig_iter=ig_iter,
                          iterations=iterations, alpha=alpha, noise=noise,
                          blur_ksize=blur_ksize, blur_sigma=blur_sigma,
                          internal_batch_size=internal_batch_size, seed=seed)
    combined = upsample(masks[:, 0] * masks[:, 1], x.shape[-2:])
    return (1 - combined).expand_as(x).contiguous()


def igos_pp_masks(model: nn.Module, x: Tensor, target: Tensor, *, size: int, L1: float,
                  L2: float, ig_iter: int, iterations: int, alpha: float, noise: float,
                  blur_ksize: int, blur_sigma: float, internal_batch_size: int,
                  seed: int) -> Tensor:
    """The optimized masks (B, 2, 1, size, size): [:, 0] deletion, [:, 1] insertion, in [0, 1]."""
    if ig_iter < 1 or internal_batch_size < 1:
        raise ValueError(f"ig_iter and internal_batch_size must be >= 1, got {ig_iter}, "
                         f"{internal_batch_size}")
    image = x.detach()
    # Same function, and its ~10^4 passes skip every BatchNorm. The line search's accept/reject
    # decisions see the loss up to rounding, so the masks may differ from the unfolded model's.
    model = gradient_model(model)
    problem = IgosProblem(model, image, blurred_baseline(image, blur_ksize, blur_sigma),
                          target.to(x.device), ig_iter, noise, L1, L2, internal_batch_size,
                          seed, *bilateral_weights(image))
    masks = torch.ones(x.shape[0], 2, 1, size, size, dtype=x.dtype, device=x.device)
    for iteration in range(iterations):
        grads = problem.gradient(masks, iteration)
        steps = line_search(problem, masks, grads, alpha, iteration)
        masks = (masks - steps.view(-1, 1, 1, 1, 1) * grads).clamp(0, 1)
    return masks


# --- the optimization problem -----------------------------------------------------------------

@dataclass
class IgosProblem:
    """Loss and gradient of iGOS++ for a batch of images (B, C, H, W) and their blurred
    baselines; ``edges_v`` (B, 1, H-1, W) and ``edges_h`` (B, 1, H, W-1) are bilateral weights.
    """
    model: nn.Module
    image: Tensor
    baseline: Tensor
    target: Tensor
    ig_iter: int
    noise: float
    L1: float
    L2: float
    internal_batch_size: int
    seed: int
    edges_v: Tensor
    edges_h: Tensor

    def loss(self, masks: Tensor, samples: Tensor, key: tuple[int, ...]) -> Tensor:
        """The loss (n,) of masks (n, 2, 1, s, s) for the images ``samples`` (n,)."""
        scores, _ = self.integrated_scores(term_masks(masks, self.image.shape[-2:]), samples,
                                           key, with_grad=False)
        return scores + self.regularization(masks[:, 0] * masks[:, 1], samples)

    def gradient(self, masks: Tensor, iteration: int) -> Tensor:
        """d loss / d masks (B, 2, 1, s, s), the integrated-score part halved as the reference
        does ("to balance out the terms with the regularization terms")."""
        samples = torch.arange(masks.shape[0], device=masks.device)
        leaf = masks.detach().requires_grad_(True)
        with torch.enable_grad():
            pixel_masks = term_masks(leaf, self.image.shape[-2:])
            _, pixel_grads = self.integrated_scores(pixel_masks.detach(), samples,
                                                    (iteration, 0), with_grad=True)
            surrogate = (pixel_masks * pixel_grads).sum() / 2 + self.regularization(
                leaf[:, 0] * leaf[:, 1], samples).sum()
            (grads,) = torch.autograd.grad(surrogate, leaf)
        return grads.detach()

    def integrated_scores(self, pixel_masks: Tensor, samples: Tensor, key: tuple[int, ...],
                          with_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Sum over TERMS of +-(mean probability of the target on the term's noisy path).

        pixel_masks: (n, 4, 1, H, W) for the images ``samples`` (n,). Returns the scores (n,)
        and, ``with_grad``, their gradient w.r.t. pixel_masks (n, 4, 1, H, W). The n * 4 *
        ig_iter path points run in chunks of at most ``internal_batch_size`` rows.
        """
        n, terms, steps = len(samples), len(TERMS), self.ig_iter
        noise = self.path_noise(key)
        scores = torch.zeros(n * terms, dtype=self.image.dtype, device=self.image.device)
        grads = torch.zeros(n * terms, *pixel_masks.shape[2:], dtype=self.image.dtype,
                            device=self.image.device) if with_grad else None
        for rows in torch.arange(n * terms * steps, device=self.image.device).split(
                self.internal_batch_size):
            pair, term, step = rows // steps, (rows // steps) % terms, rows % steps
            sample = samples[rows // (steps * terms)]
            keep, drop, sign = self.path_ends(sample, term)
            t = ((step + 1.0) / steps).to(self.image.dtype).view(-1, 1, 1, 1)
            blend = t * pixel_masks.flatten(0, 1)[pair]
            points = keep * blend + drop * (1 - blend) + noise[term, step]
            prob, prob_grad = target_probability(self.model, points, self.target[sample],
                                                 with_grad)
            scores.index_add_(0, pair, sign * prob / steps)
            if with_grad:
                pixel = (prob_grad * (keep - drop)).sum(dim=1, keepdim=True)
                grads.index_add_(0, pair, sign.view(-1, 1, 1, 1) * t * pixel / steps)
        scores = scores.view(n, terms).sum(dim=1)
        return scores, None if grads is None else grads.view(n, terms, *grads.shape[1:])

    def path_ends(self, sample: Tensor, term: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row: the image kept where the mask is 1, the one where it is 0, and the sign of
        the score in the loss (deletion +, insertion -)."""
        deletion = torch.tensor([name == "deletion" for name in TERMS],
                                device=term.device)[term]
        where = deletion.view(-1, 1, 1, 1)
        image, baseline = self.image[sample], self.baseline[sample]
        sign = torch.where(deletion, 1.0, -1.0).to(self.image.dtype)
        return (torch.where(where, image, baseline), torch.where(where, baseline, image), sign)

    def path_noise(self, key: tuple[int, ...]) -> Tensor:
        """Input noise N(0, noise^2) of one loss evaluation, (len(TERMS), ig_iter, C, H, W).

        Drawn from a generator seeded by (seed, *key) and shared by all images, so an image's
        map depends neither on the other images of the batch nor on the chunking."""
        state = np.random.SeedSequence([self.seed, *key]).generate_state(1, dtype=np.uint64)
        generator = torch.Generator(device=self.image.device).manual_seed(int(state[0] >> 1))
        shape = (len(TERMS), self.ig_iter, *self.image.shape[1:])
        return self.noise * torch.randn(shape, generator=generator, device=self.image.device,
                                        dtype=self.image.dtype)

    def regularization(self, mask: Tensor, samples: Tensor) -> Tensor:
        """L1 * mean|1 - m| + L2 * bilateral TV of the combined masks (n, 1, s, s) -> (n,)."""
        area = (1 - mask).abs().flatten(1).mean(dim=1)
        return self.L1 * area + self.L2 * self.bilateral_tv(mask, samples)

    def bilateral_tv(self, mask: Tensor, samples: Tensor) -> Tensor:
        """Half the sum of the masks' TV and of the upsampled masks' TV weighted by
        exp(-|image difference|^2 / sigma) between neighbours. (n, 1, s, s) -> (n,)."""
        up = upsample(mask, self.image.shape[-2:])
        tv = (difference_power(mask, -2).mean(dim=(1, 2, 3))
              + difference_power(mask, -1).mean(dim=(1, 2, 3)))
        bilateral = ((self.edges_v[samples] * difference_power(up, -2)).mean(dim=(1, 2, 3))
                     + (self.edges_h[samples] * difference_power(up, -1)).mean(dim=(1, 2, 3)))
        return 0.5 * (tv + bilateral)


def line_search(problem: IgosProblem, masks: Tensor, grads: Tensor, alpha: float,
                iteration: int) -> Tensor:
    """Backtracking line search per image: from ``alpha``, shrink the step by DECAY until the
    loss drops by at least ARMIJO_BETA * step * |grad|^2, or the step is below MIN_STEP.

    masks, grads: (B, 2, 1, s, s) -> steps (B,). Only images still searching are evaluated.
    """
    everyone = torch.arange(masks.shape[0], device=masks.device)
    base = problem.loss(masks, everyone, (iteration, 1))
    slope = -ARMIJO_BETA * grads.flatten(1).pow(2).sum(dim=1)
    steps = torch.full_like(base, alpha)
    searching = torch.ones_like(base, dtype=torch.bool)
    attempt = 2
    while searching.any():
        idx = searching.nonzero().squeeze(1)
        trial = (masks[idx] - steps[idx].view(-1, 1, 1, 1, 1) * grads[idx]).clamp(0, 1)
        loss = problem.loss(trial, idx, (iteration, attempt))
        failed = (loss > base[idx] + steps[idx] * slope[idx]) & (steps[idx] >= MIN_STEP)
        searching[idx] = failed
        steps[idx[failed]] *= DECAY
        attempt += 1
    return steps


# --- pieces -----------------------------------------------------------------------------------

def target_probability(model: nn.Module, points: Tensor, target: Tensor,
                       with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """softmax(model(points))[target] (n,) and, ``with_grad``, its input gradient (n, C, H, W).

    A detached leaf takes the gradient (autograd.grad), so no parameter ``.grad`` appears."""
    if not with_grad:
        with torch.no_grad():
            return target_logits(model(points).softmax(dim=1), target), None
    leaf = points.detach().requires_grad_(True)
    with torch.enable_grad():
        prob = target_logits(model(leaf).softmax(dim=1), target)
        (grad,) = torch.autograd.grad(prob.sum(), leaf)
    return prob.detach(), grad.detach()


def term_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixel masks of the TERMS: (n, 2, 1, s, s) -> (n, 4, 1, H, W) = [U(d) U(i), U(d) U(i),
    U(d), U(i)], U the bilinear upsampling (the reference multiplies the upsampled masks)."""
    deletion, insertion = upsample(masks[:, 0], size), upsample(masks[:, 1], size)
    combined = deletion * insertion
    return torch.stack([combined, combined, deletion, insertion], dim=1)


def upsample(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with aligned corners (torch's UpsamplingBilinear2d, as the
    reference). (n, 1, s, s) -> (n, 1, H, W)."""
    return F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=True)


def difference_power(images: Tensor, dim: int) -> Tensor:
    """|neighbour difference|^TV_BETA along ``dim``."""
    return (images.diff(dim=dim)).abs().pow(TV_BETA)


def bilateral_weights(image: Tensor) -> tuple[Tensor, Tensor]:
    """exp(-mean over channels of the squared difference / sigma) between vertical and
    horizontal neighbours: (B, 1, H-1, W) and (B, 1, H, W-1). (The reference averages the
    channels inside or outside the exp for the two directions; the paper uses the norm.)"""
    return tuple(torch.exp(-image.diff(dim=dim).pow(2).mean(dim=1, keepdim=True)
                           / BILATERAL_SIGMA) for dim in (-2, -1))


def blurred_baseline(image: Tensor, ksize: int, sigma: float) -> Tensor:
    """cv2.GaussianBlur(image, (ksize, ksize), sigma) per channel with reflect-101 borders (the
    reference's baseline). Blurring commutes with the per-channel affine normalization, so
    blurring the normalized input equals normalizing the blurred photo. The kernel radius is
    capped at the image size minus one (reflection needs it). (B, C, H, W) -> (B, C, H, W)."""
    return _blur_along(_blur_along(image, -2, ksize, sigma), -1, ksize, sigma)


def _blur_along(images: Tensor, dim: int, ksize: int, sigma: float) -> Tensor:
    radius = min(ksize // 2, images.shape[dim] - 1)
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    vertical = dim == -2
    shape = (-1, 1) if vertical else (1, -1)
    pad = (0, 0, radius, radius) if vertical else (radius, radius, 0, 0)
    channels = images.shape[1]
    weight = (kernel / kernel.sum()).view(1, 1, *shape).repeat(channels, 1, 1, 1)
    return F.conv2d(F.pad(images, pad, mode="reflect"), weight, groups=channels)
