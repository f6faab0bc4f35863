"""Random inputs for the point-op tests, with the edge cases mixed in."""
import torch


def random_points(n, height, width, gen, dtype=torch.float32, margin=0.25):
    """(n, 2) (x, y) pixel coordinates over an image of height x width pixels.

    A quarter are uniform over the image plus a margin outside it; the rest
    sit exactly on the places where rounding matters: cell centres and cell
    borders of strides 1 to 16, and the image edges.
    """
    size = torch.tensor([width, height], dtype=torch.float64)
    lo, hi = -margin * size, (1 + margin) * size
    uniform = lo + (hi - lo) * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    stride = 2 ** torch.randint(0, 5, (n, 1), generator=gen)
    cells = torch.floor(torch.rand(n, 2, generator=gen, dtype=torch.float64) * size / stride)
    centres = (cells + 0.5) * stride
    borders = cells * stride
    edges = torch.where(torch.rand(n, 2, generator=gen) < 0.5, 0.0, size)
    kind = torch.randint(0, 4, (n, 1), generator=gen)
    pts = torch.where(kind == 0, uniform, torch.where(kind == 1, centres,
                      torch.where(kind == 2, borders, edges)))
    # Mix the kinds per axis too: an edge x with a centre y, and so on.
    swap = torch.rand(n, generator=gen) < 0.3
    pts[swap, 1] = uniform[swap, 1]
    return pts.to(dtype)


def random_batch(num_images, channels, height, width, stride, n_points, gen, dtype=torch.float32):
    """Features (B, C, H, W), points spread over the B images, their batch indices and
    image sizes (each image a little smaller than the padded map, as in an ImageList)."""
    features = torch.randn(num_images, channels, height, width, generator=gen, dtype=dtype)
    batch_idx = torch.randint(0, num_images, (n_points,), generator=gen)
    full = torch.tensor([height * stride, width * stride])
    image_sizes = (full - torch.randint(0, stride * 2, (num_images, 2), generator=gen)).clamp(min=0)
    points = random_points(n_points, height * stride, width * stride, gen, dtype=torch.float64)
    return features, points.to(dtype), batch_idx, image_sizes.long()


def forward_backward(fn, features, gen):
    """fn(features) and the gradient of <fn(features), g> for a random g drawn from `gen`."""
    features = features.detach().clone().requires_grad_(True)
    out = fn(features)
    upstream = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, features, upstream.to(out.device))
    return out.detach(), grad


def assert_same_forward_backward(fn, features, other_fn, other_features, gen, tol):
    """Both functions give the same output and feature gradient (same upstream gradient);
    the second pair may live on another device."""
    state = gen.get_state()
    out, grad = forward_backward(fn, features, gen)
    other_out, other_grad = forward_backward(other_fn, other_features, gen.set_state(state))
    torch.testing.assert_close(other_out.cpu(), out, **tol)
    torch.testing.assert_close(other_grad.cpu(), grad, **tol)
