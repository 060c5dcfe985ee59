"""
The image data of the three scripts: the readers of real data and the procedural `toy` set.

    load_dataset(spec, image_size, split, flip, seed, crop)      (flip None: on for colour photos only)
        spec: 'toy' | an .npz (images, labels) | an MNIST-style IDX folder | an ImageFolder (DIR/<class>/*.png,
        optionally DIR/train + DIR/val)

Every dataset returns (image, label) with the image a float tensor (3, H, W) in [-1, 1], accepts ds[i] and
ds[(i, seed)] (the seed fixes that item's random crop and flip, so every rank of a DDP run draws the same ones),
and has .num_classes. Real data without a val folder is split once, stratified, by a fixed seed: every run
shares the same held-out images. Bad files and folders raise UserError with a message that says what to do.
The resize and crop follow the official pipeline: a centre crop, or the official random crop at depth >= 12.
"""

import gzip
import operator
import os
import sys
import zipfile

import numpy as np
import torch
from PIL import Image

from common import UserError, error_line, warn_once

IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm', '.pgm', '.jfif')
SPLIT_SEED = 0  # the train/val split of real data never depends on --seed, so all runs share the same val set
CROPS = ('center', 'random')
# the official random crop: the short side is first resized to a random size in [S / 1.0, S / 0.88]
MIN_CROP_FRAC, MAX_CROP_FRAC = 0.88, 1.0


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. 16-bit grey is rescaled (PIL's own convert would clip it to white),
    palette/alpha images are flattened, CMYK and grey are converted."""
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        a = np.asarray(img).astype(np.float64)
        if img.mode != 'F' and a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA')  # palette may carry transparency
    # RGBA/LA: alpha dropped, like torchvision's loader
    return img if img.mode == 'RGB' else img.convert('RGB')


def resize_center_crop(img, size):
    """Resize the shorter side to size (bicubic, antialiased by PIL) then center-crop size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def crop_side_range(size):
    """(smallest, largest) short side the random crop resizes to before cropping size x size:
    ceil(size / MAX_CROP_FRAC) and ceil(size / MIN_CROP_FRAC), computed in integers (0.88 = 88 / 100) so that
    float rounding never adds a pixel."""
    return -(-size * 100 // round(MAX_CROP_FRAC * 100)), -(-size * 100 // round(MIN_CROP_FRAC * 100))


def resize_short_side(img, side):
    """Resize so the shorter side is `side`: first halve with BOX filtering while the short side is still at
    least 2 x side (cheap, and keeps large photos from aliasing), then one BICUBIC resize to the exact size.
    """
    while min(img.size) >= 2 * side:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    w, h = img.size
    s = side / min(w, h)
    size = (side, max(side, round(h * s))) if w <= h else (max(side, round(w * s)), side)
    return img.resize(size, Image.BICUBIC)


def random_crop(img, size, rng):
    """The random crop of the official FlexVAR / SAR training data (ADM's random_crop_arr with crop fractions
    0.88..1): resize the short side to a random integer in crop_side_range(size), then cut a random size x
    size window. rng: a numpy Generator, the only source of randomness."""
    lo, hi = crop_side_range(size)
    img = resize_short_side(img, int(rng.integers(lo, hi + 1)))
    w, h = img.size
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return img.crop((left, top, left + size, top + size))


def item_rng(seed):
    """The numpy Generator of one item's random crop / flip: from `seed` when the item was asked for as
    ds[(i, seed)], else from torch's global RNG (which the DataLoader seeds per worker)."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()))
    return np.random.default_rng(seed % 2 ** 64)


def to_tensor(arr, flip=False, rng=None):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], mirrored left-right with probability 1/2 when flip."""
    x = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    if flip and (rng or item_rng(None)).random() < 0.5:
        x = x.flip(-1)
    return x


class ImageDataset(torch.utils.data.Dataset):
    """Base of every dataset load_dataset returns: ds[i] or ds[(i, seed)] -> ((3, S, S) in [-1, 1], label).
    With (i, seed) (seed an int), the item's random crop and flip are drawn from an RNG seeded by `seed`, so a
    training loop that derives the seeds from (run seed, step, position) is reproducible and resumable
    whichever worker reads the item. Datasets without random crop or flip ignore the seed. Subclasses define
    item(i, seed) and have .labels, .class_names, .num_classes."""

    def __getitem__(self, key):
        seed = None
        if isinstance(key, tuple):
            if len(key) != 2 or not all(isinstance(k, (int, np.integer)) for k in key):
                raise TypeError(f"index a dataset with i or (i, seed), two ints; got {key!r}")
            key, seed = key
        return self.item(operator.index(key), None if seed is None else int(seed))


def stratified_split(labels, n_val):
    """Deterministic stratified split: shuffle each class, give every item a rank fraction (k+0.5)/n_class,
    and take the n_val smallest fractions as val, so each class gets ~its share. Returns (train_idx, val_idx).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(SPLIT_SEED)
    frac = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        frac[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    order = np.lexsort((labels, frac))  # by fraction, ties by class
    val = np.sort(order[:n_val])
    train = np.sort(order[n_val:])
    return train, val


def default_val_count(n):
    return min(1000, max(1 if n >= 2 else 0, round(0.05 * n)))  # 5%, at most 1000, at least 1 when possible


def pick_split(labels, split, n_val, where):
    """Indices of the requested split ('train' | 'val' | 'all')."""
    if split == 'all':
        return np.arange(len(labels))
    train, val = stratified_split(labels, n_val)
    idx = {'train': train, 'val': val}.get(split)
    if idx is None:
        raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
    if len(idx) == 0:
        raise UserError(f"split {split!r} of {where} is empty ({len(labels)} images in total); "
                        f"add more images")
    return idx


class ArrayImages(ImageDataset):
    """Images held in memory as uint8 (N, H, W[, C]) (npz and MNIST). pad=True pads small images (MNIST's 28
    px digits) with black to image_size instead of resizing them, when the border splits evenly. Always the
    centre crop (these sets come at one size)."""

    def __init__(self, images, labels, idx, image_size, flip, class_names, pad=False):
        self.images, self.idx, self.size, self.flip, self.pad = images, idx, image_size, flip, pad
        self.labels = [int(labels[i]) for i in idx]
        self.class_names = class_names
        self.num_classes = len(class_names)

    def __len__(self):
        return len(self.idx)

    def item(self, i, seed):
        a = np.ascontiguousarray(self.images[self.idx[i]])        # (an NCHW .npz is a transposed view)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)  # grey -> RGB
        elif a.shape[2] == 4:
            a = a[:, :, :3]  # drop alpha
        h, w = a.shape[:2]
        if self.pad and self.size >= max(h, w) and (self.size - h) % 2 == 0 and (self.size - w) % 2 == 0:
            p = ((self.size - h) // 2, (self.size - w) // 2)
            a = np.pad(a, ((p[0], p[0]), (p[1], p[1]), (0, 0)))  # MNIST: black border, digit keeps its pixels
        elif (h, w) != (self.size, self.size):
            a = np.asarray(resize_center_crop(Image.fromarray(a), self.size))
        return to_tensor(a, self.flip, item_rng(seed) if self.flip else None), self.labels[i]


def check_labels(labels, where):
    """Class labels must be integers 0..K-1 with every id used: the model gets K = max + 1 classes, so a float
    label would be truncated silently and sparse ids (e.g. 1000..1003) would build a 1004-class model."""
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise UserError(f"{where}: 'labels' must be integers (class ids 0..K-1), got dtype {labels.dtype}")
    labels = labels.astype(np.int64).reshape(-1)
    if len(labels) and labels.min() < 0:
        raise UserError(f"{where}: 'labels' must be >= 0 (class ids 0..K-1), found {int(labels.min())}")
    used = np.unique(labels)
    if len(used) and len(used) != used[-1] + 1:
        raise UserError(f"{where}: 'labels' use {len(used)} distinct class ids between {used[0]} and "
                        f"{used[-1]}; class ids must be 0..K-1 with every id used: remap them to "
                        f"0..{len(used) - 1} "
                        f"(e.g. np.unique(labels, return_inverse=True)[1])")
    return labels


def load_npz(path, image_size, split, flip):
    if not zipfile.is_zipfile(path):  # np.load would call any other file "pickled data"
        raise UserError(f"{path} is not a valid .npz file (not a zip archive); write one with "
                        f"np.savez(path, images=uint8 NHWC array, labels=int array)")
    try:
        with np.load(path) as z:
            key = 'images' if 'images' in z.files else 'arr_0' if 'arr_0' in z.files else None
            if key is None:
                raise UserError(f"{path} has no 'images' (or 'arr_0') array; found {z.files}")
            images = z[key]
            labels = z['labels'] if 'labels' in z.files else np.zeros(len(images), np.int64)
    except UserError:
        raise
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path} as .npz: {why}") from None
    # the layouts fid.py reads too: channels last when the last axis is 1, 3 or 4 (RGBA: alpha dropped),
    # channels first (a torch tensor's layout) only when it is not and axis 1 is, or (N, H, W) grey
    nhwc = images.ndim == 4 and images.shape[3] in (1, 3, 4)
    nchw = images.ndim == 4 and not nhwc and images.shape[1] in (1, 3, 4)
    nhw = images.ndim == 3 and images.shape[2] not in (3, 4)
    if images.dtype != np.uint8 or not (nhwc or nchw or nhw):
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, C) or (N, C, H, W) with C = 1, 3 or 4, or "
                        f"(N, H, W) grey; got {images.dtype} {images.shape}")
    images = images.transpose(0, 2, 3, 1) if nchw else images
    if len(images) == 0:
        raise UserError(f"{path} holds no images")
    labels = check_labels(labels, path)
    if len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels")
    idx = pick_split(labels, split, default_val_count(len(images)), path)
    names = [str(c) for c in range(int(labels.max()) + 1)]
    return ArrayImages(images, labels, idx, image_size, flip, names)


def read_idx(path):
    """An IDX file (optionally gzipped) -> numpy uint8 array.
    Format: 2 zero bytes, type 0x08 (uint8), ndim, then ndim big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        buf = f.read()
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file")
    nd = buf[3]
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], 'big') for i in range(nd))
    if len(buf) - 4 - 4 * nd != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: header says {shape}")
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * nd).reshape(shape)


def find_idx_pairs(d):
    """{prefix: (images_path, labels_path)} for MNIST-style files in directory d (e.g. prefix 't10k',
    'train')."""
    files = sorted(os.listdir(d))
    pairs = {}
    for f in files:
        for suf in ('-images-idx3-ubyte', '-images-idx3-ubyte.gz', '-images.idx3-ubyte'):
            if f.endswith(suf):
                prefix = f[: -len(suf)]
                lab = [g for g in files if g.startswith(prefix) and '-labels' in g and 'idx1' in g]
                if lab:
                    pairs[prefix] = (os.path.join(d, f), os.path.join(d, lab[0]))
    return pairs


def load_mnist(d, pairs, image_size, split, flip):
    """MNIST IDX folder. With a 'train' and a 't10k' pair: train/val = those files. With one pair (e.g. the
    10k test split alone): a deterministic stratified 80/20 split (8,000 / 2,000)."""
    arrays = {p: (read_idx(i), read_idx(l).astype(np.int64)) for p, (i, l) in pairs.items()}
    # the classes come from the labels of every file, so train and val agree on K (MNIST 10, EMNIST more)
    every = check_labels(np.concatenate([a[1] for a in arrays.values()]), d)
    if 'train' in arrays and 't10k' in arrays and split != 'all':
        images, labels = arrays['train' if split == 'train' else 't10k']
        idx = np.arange(len(images))
    else:
        images, labels = np.concatenate([a[0] for a in arrays.values()]), every
        idx = pick_split(labels, split, round(0.2 * len(images)), d)
    names = [str(c) for c in range(int(every.max()) + 1)]
    return ArrayImages(images, labels, idx, image_size, flip, names, pad=True)


def is_image_name(name):
    return name.lower().endswith(IMG_EXTS) and not name.startswith('.')


def image_classes(root):
    """Sorted names of root's sub-folders that hold at least one image file (searched recursively, stopping at
    the first): the classes, ids 0..K-1. Folders without images are left out, with one warning, so the ids
    stay contiguous and no class exists that no image has."""
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    classes = [c for c in dirs
               if any(any(map(is_image_name, names)) for _, _, names in os.walk(os.path.join(root, c)))]
    empty = [c for c in dirs if c not in classes]
    if empty and classes:
        warn_once(f"ignored {len(empty)} class folder(s) without images under {root}: {', '.join(empty[:8])}"
                  f"{' ...' if len(empty) > 8 else ''}")
    return classes


class ImageFolder(ImageDataset):
    """ImageNet layout: root/<class>/**/<image>. Sorted class names -> ids 0..K-1 (folders without images are
    ignored). Unreadable files are skipped and reported once: non-image extensions and files PIL cannot even
    identify are dropped when the folder is listed; files that fail later while decoding (e.g. truncated
    JPEGs) are replaced by the next good image and reported when first met, by whichever worker process meets
    them (the record of bad files is in shared memory, so the warning is not repeated every epoch or per
    worker). crop: 'center' (resize the short side, centre crop) or 'random' (random_crop, the official
    training crop)."""
    # opening every header is cheap for small sets; skip it for ImageNet-size folders
    HEADER_CHECK_MAX = 100_000

    def __init__(self, root, image_size, flip, files=None, class_names=None, crop='center'):
        self.root, self.size, self.flip, self.crop = root, image_size, flip, crop
        if files is None:
            files, class_names = self.scan(root, class_names)
        self.files = [f for f, _ in files]
        self.labels = [c for _, c in files]
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.bad = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()  # found undecodable

    @staticmethod
    def scan(root, classes=None):
        """List (path, class id) of root's images. classes: the class names to use (a val folder takes its
        train folder's), else image_classes(root)."""
        own = image_classes(root)
        if classes is None:
            classes = own
        elif set(own) - set(classes):
            extra = sorted(set(own) - set(classes))
            raise UserError(f"{root} has class folder(s) with images that the training folder lacks: "
                            f"{', '.join(extra[:8])}; both need the same classes")
        if not classes:
            raise UserError(f"no images under {root}: expected the ImageNet layout DIR/<class>/<images> "
                            f"({', '.join(IMG_EXTS)})")
        files, skipped = [], []
        for ci, c in enumerate(classes):
            for dirpath, dirnames, names in os.walk(os.path.join(root, c)):
                dirnames.sort()
                for n in sorted(names):
                    if not n.startswith('.'):
                        p = os.path.join(dirpath, n)
                        files.append((p, ci)) if is_image_name(n) else skipped.append(p)
        if len(files) <= ImageFolder.HEADER_CHECK_MAX:
            good = []
            for p, ci in files:
                try:
                    with Image.open(p) as im:
                        im.size  # header parsed
                    good.append((p, ci))
                except Exception:
                    skipped.append(p)
            files = good
        if skipped:
            warn_once(f"skipped {len(skipped)} unreadable or non-image file(s) under {root} "
                      f"(first: {sorted(skipped)[0]})")
        if not files:
            raise UserError(f"no readable images under {root} (looked for {', '.join(IMG_EXTS)} in class "
                            f"sub-folders)")
        return files, classes

    def __len__(self):
        return len(self.files)

    def load(self, i, rng):
        with Image.open(self.files[i]) as im:
            im.load()  # decode now so truncated data fails here
            img = to_rgb(im)
        if self.crop == 'random':
            return np.asarray(random_crop(img, self.size, rng))
        return np.asarray(resize_center_crop(img, self.size))
        return np.asarray(img)

    def item(self, i, seed):
        rng = item_rng(seed) if self.crop == 'random' or self.flip else None
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            if self.bad[j]:
                continue
            try:
                return to_tensor(self.load(j, rng), self.flip, rng), self.labels[j]
            except Exception as e:
                if not self.bad[j]:
                    self.bad[j] = True
                    print(f"warning: skipped unreadable image {self.files[j]} ({type(e).__name__}: {e}); "
                          f"{int(self.bad.sum())} skipped so far", file=sys.stderr)
        raise UserError(f"no image under {self.root} could be decoded")

    def subset(self, idx):
        files = [(self.files[i], self.labels[i]) for i in idx]
        return ImageFolder(self.root, self.size, self.flip, files, self.class_names, self.crop)


def load_image_folder(d, image_size, split, flip, crop):
    tv = [os.path.join(d, s) for s in ('train', 'val')]
    if all(os.path.isdir(p) for p in tv):  # explicit train/val layout: the val folder takes train's class ids
        classes = image_classes(tv[0])
        if split != 'all':
            return ImageFolder(tv[0] if split == 'train' else tv[1], image_size, flip, class_names=classes,
                               crop=crop)
        a, b = (ImageFolder(p, image_size, flip, class_names=classes) for p in tv)
        files = list(zip(a.files + b.files, a.labels + b.labels))
        return ImageFolder(d, image_size, flip, files, classes, crop)
    full = ImageFolder(d, image_size, flip, crop=crop)
    return full.subset(pick_split(full.labels, split, default_val_count(len(full)), d))

# --- the procedural 'toy' dataset ---


TOY_SIZES = {'train': 20000, 'val': 1000}
TOY_CLASSES = ['disc', 'square', 'triangle', 'h-stripes', 'v-stripes', 'two-discs', 'plus', 'ring',
               'diagonal', 'four-squares']
# a base colour per class (RGB in [0, 1]); the class fixes shape, layout and colour, samples jitter around it
TOY_COLOURS = np.array([[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1],
                        [0.1, 0.85, 0.9], [0.85, 0.15, 0.8], [1.0, 0.55, 0.05], [0.95, 0.95, 0.95],
                        [0.55, 0.35, 0.15], [0.55, 0.2, 0.9]])


def toy_image(label, rng, size):
    """Render one toy image as (size, size, 3) uint8. Shapes are soft-edged signed-distance masks evaluated on
    the pixel grid, so any resolution works and edges are anti-aliased. Coordinates are in [-1, 1]."""
    t = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(t, t, indexing='ij')  # (S, S) each
    cx, cy = rng.uniform(-0.2, 0.2, 2)  # position jitter
    r = rng.uniform(0.4, 0.6)  # size jitter
    col = np.clip(TOY_COLOURS[label] + rng.normal(0, 0.07, 3), 0, 1)  # colour jitter
    # background: a muted vertical gradient between two random dark colours
    b0, b1 = rng.uniform(0.05, 0.45, 3), rng.uniform(0.05, 0.45, 3)
    w = (y[..., None] + 1) / 2
    img = b0 * (1 - w) + b1 * w  # (S, S, 3)
    px = 2.0 / size  # one pixel in these coordinates: edge softness

    def soft(d):  # signed distance (negative inside) -> coverage in [0, 1]
        return np.clip(0.5 - d / px, 0, 1)
    X, Y = x - cx, y - cy
    if label == 0:  # disc
        m = soft(np.hypot(X, Y) - r)
    elif label == 1:  # axis-aligned square
        m = soft(np.maximum(abs(X), abs(Y)) - r * 0.8)
    elif label == 2:  # upward triangle: three half-planes at inradius r/2 (y points down)
        m = soft(np.maximum(Y, np.maximum(0.866 * X - 0.5 * Y, -0.866 * X - 0.5 * Y)) - r * 0.5)
    elif label == 3:  # horizontal stripes, period 1.6 r
        m = soft((np.abs(((Y / (r * 0.8)) % 2) - 1) - 0.5) * r * 0.8)
    elif label == 4:  # vertical stripes, period 1.6 r
        m = soft((np.abs(((X / (r * 0.8)) % 2) - 1) - 0.5) * r * 0.8)
    elif label == 5:  # two discs side by side
        d = np.minimum(np.hypot(X - r * 0.75, Y), np.hypot(X + r * 0.75, Y)) - r * 0.5
        m = soft(d)
    elif label == 6:  # plus sign
        d = np.minimum(np.maximum(abs(X) - r * 0.25, abs(Y) - r), np.maximum(abs(X) - r, abs(Y) - r * 0.25))
        m = soft(d)
    elif label == 7:  # ring
        m = soft(abs(np.hypot(X, Y) - r * 0.8) - r * 0.2)
    elif label == 8:  # diagonal split: lower-left half coloured
        m = soft((X - Y) / 1.414)
    else:  # 2 x 2 grid of small squares
        d = np.maximum(abs(abs(X) - r * 0.55), abs(abs(Y) - r * 0.55)) - r * 0.3
        m = soft(d)
    img = img * (1 - m[..., None]) + col * m[..., None]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class ToyDataset(ImageDataset):
    """10 procedural classes, rendered on the fly from (seed, split, index); no download, fully deterministic.
    Label = index % 10 (balanced). train and val use different RNG streams so the sets do not overlap."""

    def __init__(self, image_size, split='train', flip=False, seed=0):
        self.size, self.flip, self.seed = image_size, flip, seed
        self.parts = ['train', 'val'] if split == 'all' else [split]
        if split not in ('train', 'val', 'all'):
            raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.n = [TOY_SIZES[p] for p in self.parts]
        self.labels = [i % 10 for p in self.parts for i in range(TOY_SIZES[p])]
        self.class_names = list(TOY_CLASSES)
        self.num_classes = 10

    def __len__(self):
        return sum(self.n)

    def item(self, i, seed):
        part = 0 if i < self.n[0] else 1
        j = i - (self.n[0] if part else 0)
        split_id = {'train': 0, 'val': 1}[self.parts[part]]
        rng = np.random.default_rng([self.seed, split_id, j])  # the image: fixed by (--seed, split, index)
        x = to_tensor(toy_image(j % 10, rng, self.size), self.flip, item_rng(seed) if self.flip else None)
        return x, j % 10


def colour_photos(ds, n=64):
    """True when ds holds colour images (the first n images differ between R, G and B by more than a grey
    JPEG's noise): photos, whose mirror image is as likely as the image itself. False for grey sets (digits,
    letters: a mirrored 2 is no digit) and for the toy set (its 'diagonal' class mirrors into another one)."""
    if isinstance(ds, ToyDataset) or len(ds) == 0:
        return False
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])  # (n, 3, S, S) in [-1, 1]
    return bool(((x[:, 0] - x[:, 1]).abs() + (x[:, 1] - x[:, 2]).abs()).mean() > 0.04)


def load_dataset(spec, image_size, split='train', flip=False, seed=0, crop='center'):
    """spec: 'toy' | path to .npz | MNIST IDX folder | ImageFolder dir -> Dataset of ((3, S, S) in [-1, 1],
    label), indexable as ds[i] or ds[(i, seed)] (see ImageDataset), with .num_classes, .labels and
    .class_names. flip: random horizontal flips; None = on for colour photos (colour_photos), off otherwise;
    the choice is ds.flip. seed: the toy set's content seed. crop: 'center', or 'random' = the official
    training crop (random_crop) for ImageFolder data, whose val split always uses the centre crop; in-memory
    sets (npz, MNIST, toy) come at one size and always use the centre crop. Raises UserError when the data
    are missing, empty or bad."""
    ds = read_dataset(spec, image_size, split, bool(flip), seed, crop)
    if flip is None:
        ds.flip = colour_photos(ds)
    return ds


def read_dataset(spec, image_size, split, flip, seed, crop):
    if split not in ('train', 'val', 'all'):
        raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}; use 'center' or 'random'")
    if spec == 'toy':
        return ToyDataset(image_size, split, flip, seed)
    path = os.path.expanduser(os.fspath(spec))
    if not os.path.exists(path):
        raise UserError(f"dataset not found: {path} (give 'toy', an .npz file, an MNIST IDX folder or an "
                        f"image folder)")
    if os.path.isfile(path):
        if path.endswith('.npz'):
            return load_npz(path, image_size, split, flip)
        raise UserError(f"{path} is a file but not an .npz; give a folder of class sub-folders, an MNIST "
                        f"folder or an .npz")
    pairs = find_idx_pairs(path)
    if pairs:
        return load_mnist(path, pairs, image_size, split, flip)
    return load_image_folder(path, image_size, split, flip, 'center' if split == 'val' else crop)


if __name__ == '__main__':  # python data.py SPEC: 'photos' or 'other', the kind train.sh picks its recipe by
    asked = sys.argv[1:] in (['-h'], ['--help'])
    if asked or len(sys.argv) != 2:     # usage: on stdout when asked for, else an error (exit status 2)
        print("usage: python data.py DATA   (prints 'photos' for colour photos, else 'other'; DATA: toy, an "
              "ImageFolder, an .npz or MNIST IDX files)", file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    try:
        print('photos' if colour_photos(load_dataset(sys.argv[1], 32, 'train')) else 'other')
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
