"""
CPU tests of fid.py (no network, no pretrained Inception weights): closed forms and oracles for the metrics,
the Inception key list against the published checksum, synthetic weight files, preprocessing against an
independent NumPy reference, the input formats, the CLI, and the domain classifier.
Run: python -m pytest -q test_fid.py
"""

import hashlib
import importlib.machinery
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

import fid

HERE = os.path.dirname(os.path.abspath(__file__))
MNIST = os.environ.get('MNIST', os.path.join(HERE, 'data', 'mnist'))   # the MNIST IDX folder, optional
GOLDEN = os.path.join(HERE, 'tests', 'fixtures', 'inception_golden.npz')
GOLDEN_MAKER = os.path.join(HERE, 'tests', 'fixtures', 'make_inception_golden.py')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # One torch thread for the whole module, in this process and in the fid.py processes it starts. fid.main()
    # picks a thread count at start (fid.set_threads); $OMP_NUM_THREADS makes it keep this one. Two reasons:
    # tests compare results of fid.main() with results computed here to the last bit (another thread count
    # changes the last digits of a FID), and on a busy 2-core machine one thread is the faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('OMP_NUM_THREADS', '1')
        yield
    torch.set_num_threads(n)


@pytest.mark.parametrize('mod', ['fid', 'cpu_speed'])
def test_set_threads_explicit_env_or_free_cores(monkeypatch, mod):
    """One thread policy: fid.py's copy (it runs alone) and the project's cpu_speed.set_threads behave alike."""
    mod = fid if mod == 'fid' else __import__('cpu_speed')
    before = torch.get_num_threads()
    looks = iter([])

    def fake_open(path, *a, **k):  # /proc/loadavg: field 4 is runnable/total tasks, this process included
        assert path == '/proc/loadavg'
        return io.StringIO(f"3.10 2.50 1.00 {next(looks)}/412 9999\n")
    monkeypatch.setattr(mod, 'open', fake_open, raising=False)  # a module global 'open' shadows the builtin
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(time, 'sleep', lambda s: None)
    try:
        monkeypatch.setenv('OMP_NUM_THREADS', '2')
        torch.set_num_threads(3)
        assert mod.set_threads() == 3  # $OMP_NUM_THREADS set: torch already follows it, left alone
        assert mod.set_threads(2) == 2  # an explicit count wins over everything, /proc not read
        monkeypatch.delenv('OMP_NUM_THREADS')
        # 6 cores; 10 looks at the runnable count (1 = this process alone): median of the others' 0..4 busy
        looks = iter(['3', '1', '2', '5', '3', '3', '4', '1', '3', '2'])  # others: 2 0 1 4 2 2 3 0 2 1 -> 2
        assert mod.set_threads() == 6 - 2
        looks = iter(['40'] * 10)  # more busy tasks than cores: at least one thread
        assert mod.set_threads() == 1
        looks = iter(['1'] * 10)  # idle: every core this process may use
        assert mod.set_threads() == 6
        looks = iter(['garbage'] * 10)  # unreadable: every core
        assert mod.set_threads() == 6
    finally:
        torch.set_num_threads(before)


def test_main_sets_threads_once_at_start(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fid, 'set_threads', lambda n=0: calls.append(n))
    np.savez(tmp_path / 's.npz', mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / 'r.npz', mu=np.ones(3), sigma=np.eye(3))
    assert fid.main([str(tmp_path / 's.npz'), str(tmp_path / 'r.npz'), '--threads', '3']) == 0
    assert fid.main([str(tmp_path / 's.npz'), str(tmp_path / 'r.npz')]) == 0
    assert calls == [3, 0]


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every test runs with downloads blocked and an empty torch hub cache."""
    def blocked(*a, **k):
        raise OSError("network blocked in tests")
    monkeypatch.setattr(torch.hub, 'download_url_to_file', blocked)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', blocked)
    monkeypatch.setattr('urllib.request.urlopen', blocked)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)  # re-read TORCH_HOME


def rand_spd(rng, d, n=None):
    a = rng.normal(size=(n or 2 * d, d))
    return a.T @ a / len(a) + 0.1 * np.eye(d)


def rand_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))

# -----------------------------------------------------------------------------
# Frechet distance


def test_fd_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect, rel=1e-10)
    q = rand_orthogonal(rng, d)  # simultaneously diagonalisable full covariances: same closed form
    got = fid.frechet_distance(mu1, q @ np.diag(v1) @ q.T, mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expect, rel=1e-9)


def test_fd_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    d = 2048
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expect = ((mu1 - mu2) ** 2).sum()
    assert fid.frechet_distance(mu1, np.eye(d), mu2, np.eye(d)) == pytest.approx(expect, rel=1e-12)
    s = rand_spd(rng, 64)
    expect = ((mu1[:64] - mu2[:64]) ** 2).sum()
    assert fid.frechet_distance(mu1[:64], s, mu2[:64], s) == pytest.approx(expect, rel=1e-8)


def test_fd_identical_stats_is_zero_up_to_rounding():
    rng = np.random.default_rng(2)
    for n in (500, 40):  # full rank, and rank-deficient (N < d: rounding-level eigenvalues must not add up)
        mu, s = fid.gaussian_stats(rng.normal(size=(n, 128)) @ rng.normal(size=(128, 128)))
        assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_fd_refuses_nonfinite_statistics_and_overflow():
    mu, s = np.zeros(4), np.eye(4)
    for i, bad in enumerate((np.nan, np.inf, -np.inf)):
        args = [mu.copy(), s.copy(), mu.copy(), s.copy()]
        args[i % 4][(1,) * args[i % 4].ndim] = bad
        with pytest.raises(fid.UserError, match=f"NaN or inf values: {['mu1', 'sigma1', 'mu2'][i]}$"):
            fid.frechet_distance(*args)
    with pytest.raises(fid.UserError, match='came out inf: the statistics overflow float64'):
        fid.frechet_distance(np.full(4, 1e200), s, np.full(4, -1e200), s)  # |mu1 - mu2|^2 = 1.6e401


def test_gaussian_stats_need_two_rows():
    with pytest.raises(fid.UserError, match='2 or more feature vectors, got 1'):
        fid.gaussian_stats(np.ones((1, 5)))  # one row's unbiased covariance is 0/0 = NaN
    mu, sigma = fid.gaussian_stats(np.array([[0.0, 1.0], [2.0, 5.0]]))
    assert mu.tolist() == [1.0, 3.0] and sigma.tolist() == [[2.0, 4.0], [4.0, 8.0]]


def test_gaussian_stats_are_numpy_mean_and_unbiased_cov():
    a = np.random.default_rng(12).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = fid.gaussian_stats(a)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, a.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-10)  # N - 1


def test_fd_invariances():
    rng = np.random.default_rng(3)
    d = 32
    a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) + 0.5

    def fd(x, y):
        return fid.frechet_distance(*fid.gaussian_stats(x), *fid.gaussian_stats(y))
    base = fd(a, b)
    assert base > 1
    assert fd(b, a) == pytest.approx(base, rel=1e-9)  # symmetric
    q = rand_orthogonal(rng, d)
    assert fd(a @ q, b @ q) == pytest.approx(base, rel=1e-9)  # rotation (NHWC vs NCHW order is a permutation)
    perm = rng.permutation(d)
    assert fd(a[:, perm], b[:, perm]) == pytest.approx(base, rel=1e-9)
    shift = rng.normal(size=d) * 10
    assert fd(a + shift, b + shift) == pytest.approx(base, rel=1e-9)
    assert fd(3 * a, 3 * b) == pytest.approx(9 * base, rel=1e-9)


@pytest.mark.parametrize('d', [64, 256])
def test_fd_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rand_spd(rng, d), rand_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)  # the TTUR / pytorch-fid formula, used only as an oracle
    oracle = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(oracle, rel=1e-8)


def test_fd_rank_deficient_and_monte_carlo():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(100, 256)), rng.normal(size=(100, 256)) + 0.1  # N < d: singular covariances
    v = fid.frechet_distance(*fid.gaussian_stats(a), *fid.gaussian_stats(b))
    # closed form: S = X^T X / (n-1) with X the centred rows; the non-zero eigenvalues of S_a S_b are those of
    # (X_a X_b^T)(X_a X_b^T)^T / (n-1)^2, so Tr((S_a S_b)^1/2) = nuclear norm of X_a X_b^T / (n-1)
    xa, xb = a - a.mean(0), b - b.mean(0)
    expect = (((a.mean(0) - b.mean(0)) ** 2).sum() + ((xa ** 2).sum() + (xb ** 2).sum()
              - 2 * np.linalg.svd(xa @ xb.T, compute_uv=False).sum()) / 99)
    assert v == pytest.approx(expect, rel=1e-9)
    # samples of N(0, I) and N(m, diag(4)) in d=4: FD = |m|^2 + 4 * (2-1)^2; the estimate converges as N grows
    d, m = 4, np.array([1.0, 0, 0, 0])
    truth = 1.0 + 4.0

    def err(n):
        return np.mean([abs(fid.frechet_distance(*fid.gaussian_stats(r.normal(size=(n, d))),
                                                 *fid.gaussian_stats(m + 2 * r.normal(size=(n, d)))) - truth)
                        for r in map(np.random.default_rng, range(10))])
    e_small, e_large = err(50), err(20000)
    assert e_large < 0.05 and e_large < e_small / 5

# -----------------------------------------------------------------------------
# Inception Score


def test_is_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((300, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == 0


@pytest.mark.parametrize('k', [10, 1008])
def test_is_confident_balanced_classes_is_k(k):
    n = 3 * k
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(n) % k] = 50.0
    assert fid.inception_score(logits)[0] == pytest.approx(k, rel=1e-6)


def test_is_splits_of_5000_like_adm():
    # 12,000 samples -> splits 5000 / 5000 / 2000: one class, 2 balanced classes, 4 balanced classes
    logits = np.zeros((12000, 1008), np.float32)
    cls = np.concatenate([np.zeros(5000, int), np.arange(5000) % 2, np.arange(2000) % 4])
    logits[np.arange(12000), cls] = 50.0
    mean, std = fid.inception_score(logits)
    assert mean == pytest.approx(7 / 3, rel=1e-6) and std == pytest.approx(np.std([1, 2, 4]), rel=1e-6)
    perm = np.concatenate([np.random.default_rng(0).permutation(5000), 5000 + np.arange(7000)])
    assert fid.inception_score(logits[perm])[0] == pytest.approx(mean, rel=1e-12)  # order within a split
    # one split of everything: one-hot predictions -> IS = exp(entropy of the class marginal), counts
    # 8000/3000/500/500
    p = np.array([8000, 3000, 500, 500]) / 12000
    expect = np.exp(-(p * np.log(p)).sum())
    assert fid.inception_score(logits, split_size=12000)[0] == pytest.approx(expect, rel=1e-6)

# -----------------------------------------------------------------------------
# precision / recall


def test_pr_identical_and_far_apart():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 8))
    assert fid.precision_recall(a, a) == (1.0, 1.0)
    assert fid.precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_pr_hand_computed_1d():
    # ref 0,1,2,3,10: squared 3rd-NN radii (self excluded) 9, 4, 4, 9, 81
    # gen -4 (out), 5.5 (within 3 of 3 -> in), 20 (100 > 81: out), 13 (9 <= 81: in) -> precision 2/4
    # gen radii are 576, 210.25, 576, 289: every ref point lies within 24 of -4 -> recall 1
    ref = np.array([[0.0], [1], [2], [3], [10]])
    gen = np.array([[-4.0], [5.5], [20], [13]])
    assert fid.precision_recall(ref, gen) == (0.5, 1.0)
    r = fid.knn_radii(torch.tensor(ref, dtype=torch.float32))
    assert r.tolist() == [9, 4, 4, 9, 81]


def brute_force_pr(ref, gen, k=3):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, 1)[:, k]

    def cover(x, c, r):
        return np.mean([any(((p - c) ** 2).sum(-1) <= r) for p in x])
    return cover(gen, ref, radii(ref)), cover(ref, gen, radii(gen))


@pytest.mark.parametrize('n_ref,n_gen,d', [(300, 250, 16), (200, 500, 32)])
def test_pr_matches_brute_force_any_block(n_ref, n_gen, d):
    rng = np.random.default_rng(d)
    ref, gen = rng.normal(size=(n_ref, d)), rng.normal(size=(n_gen, d)) * 1.2 + 0.3
    expect = brute_force_pr(ref, gen)
    assert 0 < expect[0] < 1 and 0 < expect[1] < 1
    assert fid.precision_recall(ref, gen, block=10000) == pytest.approx(expect, abs=1e-12)
    assert fid.precision_recall(ref, gen, block=7) == pytest.approx(expect, abs=1e-12)

# -----------------------------------------------------------------------------
# the Inception network and its weights

# conv weight shape (out, in, kh, kw) of each of the 94 BasicConv2d, i.e. the published key list: each
# contributes P.conv.weight and P.bn.{weight,bias,running_mean,running_var}; plus fc.weight (1008, 2048),
# fc.bias (1008,)
CONV_TABLE = """
Conv2d_1a_3x3 32 3 3 3
Conv2d_2a_3x3 32 32 3 3
Conv2d_2b_3x3 64 32 3 3
Conv2d_3b_1x1 80 64 1 1
Conv2d_4a_3x3 192 80 3 3
Mixed_5b.branch1x1 64 192 1 1
Mixed_5b.branch5x5_1 48 192 1 1
Mixed_5b.branch5x5_2 64 48 5 5
Mixed_5b.branch3x3dbl_1 64 192 1 1
Mixed_5b.branch3x3dbl_2 96 64 3 3
Mixed_5b.branch3x3dbl_3 96 96 3 3
Mixed_5b.branch_pool 32 192 1 1
Mixed_5c.branch1x1 64 256 1 1
Mixed_5c.branch5x5_1 48 256 1 1
Mixed_5c.branch5x5_2 64 48 5 5
Mixed_5c.branch3x3dbl_1 64 256 1 1
Mixed_5c.branch3x3dbl_2 96 64 3 3
Mixed_5c.branch3x3dbl_3 96 96 3 3
Mixed_5c.branch_pool 64 256 1 1
Mixed_5d.branch1x1 64 288 1 1
Mixed_5d.branch5x5_1 48 288 1 1
Mixed_5d.branch5x5_2 64 48 5 5
Mixed_5d.branch3x3dbl_1 64 288 1 1
Mixed_5d.branch3x3dbl_2 96 64 3 3
Mixed_5d.branch3x3dbl_3 96 96 3 3
Mixed_5d.branch_pool 64 288 1 1
Mixed_6a.branch3x3 384 288 3 3
Mixed_6a.branch3x3dbl_1 64 288 1 1
Mixed_6a.branch3x3dbl_2 96 64 3 3
Mixed_6a.branch3x3dbl_3 96 96 3 3
Mixed_6b.branch1x1 192 768 1 1
Mixed_6b.branch7x7_1 128 768 1 1
Mixed_6b.branch7x7_2 128 128 1 7
Mixed_6b.branch7x7_3 192 128 7 1
Mixed_6b.branch7x7dbl_1 128 768 1 1
Mixed_6b.branch7x7dbl_2 128 128 7 1
Mixed_6b.branch7x7dbl_3 128 128 1 7
Mixed_6b.branch7x7dbl_4 128 128 7 1
Mixed_6b.branch7x7dbl_5 192 128 1 7
Mixed_6b.branch_pool 192 768 1 1
Mixed_6c.branch1x1 192 768 1 1
Mixed_6c.branch7x7_1 160 768 1 1
Mixed_6c.branch7x7_2 160 160 1 7
Mixed_6c.branch7x7_3 192 160 7 1
Mixed_6c.branch7x7dbl_1 160 768 1 1
Mixed_6c.branch7x7dbl_2 160 160 7 1
Mixed_6c.branch7x7dbl_3 160 160 1 7
Mixed_6c.branch7x7dbl_4 160 160 7 1
Mixed_6c.branch7x7dbl_5 192 160 1 7
Mixed_6c.branch_pool 192 768 1 1
Mixed_6d.branch1x1 192 768 1 1
Mixed_6d.branch7x7_1 160 768 1 1
Mixed_6d.branch7x7_2 160 160 1 7
Mixed_6d.branch7x7_3 192 160 7 1
Mixed_6d.branch7x7dbl_1 160 768 1 1
Mixed_6d.branch7x7dbl_2 160 160 7 1
Mixed_6d.branch7x7dbl_3 160 160 1 7
Mixed_6d.branch7x7dbl_4 160 160 7 1
Mixed_6d.branch7x7dbl_5 192 160 1 7
Mixed_6d.branch_pool 192 768 1 1
Mixed_6e.branch1x1 192 768 1 1
Mixed_6e.branch7x7_1 192 768 1 1
Mixed_6e.branch7x7_2 192 192 1 7
Mixed_6e.branch7x7_3 192 192 7 1
Mixed_6e.branch7x7dbl_1 192 768 1 1
Mixed_6e.branch7x7dbl_2 192 192 7 1
Mixed_6e.branch7x7dbl_3 192 192 1 7
Mixed_6e.branch7x7dbl_4 192 192 7 1
Mixed_6e.branch7x7dbl_5 192 192 1 7
Mixed_6e.branch_pool 192 768 1 1
Mixed_7a.branch3x3_1 192 768 1 1
Mixed_7a.branch3x3_2 320 192 3 3
Mixed_7a.branch7x7x3_1 192 768 1 1
Mixed_7a.branch7x7x3_2 192 192 1 7
Mixed_7a.branch7x7x3_3 192 192 7 1
Mixed_7a.branch7x7x3_4 192 192 3 3
Mixed_7b.branch1x1 320 1280 1 1
Mixed_7b.branch3x3_1 384 1280 1 1
Mixed_7b.branch3x3_2a 384 384 1 3
Mixed_7b.branch3x3_2b 384 384 3 1
Mixed_7b.branch3x3dbl_1 448 1280 1 1
Mixed_7b.branch3x3dbl_2 384 448 3 3
Mixed_7b.branch3x3dbl_3a 384 384 1 3
Mixed_7b.branch3x3dbl_3b 384 384 3 1
Mixed_7b.branch_pool 192 1280 1 1
Mixed_7c.branch1x1 320 2048 1 1
Mixed_7c.branch3x3_1 384 2048 1 1
Mixed_7c.branch3x3_2a 384 384 1 3
Mixed_7c.branch3x3_2b 384 384 3 1
Mixed_7c.branch3x3dbl_1 448 2048 1 1
Mixed_7c.branch3x3dbl_2 384 448 3 3
Mixed_7c.branch3x3dbl_3a 384 384 1 3
Mixed_7c.branch3x3dbl_3b 384 384 3 1
Mixed_7c.branch_pool 192 2048 1 1
"""
# sha256 over sorted "key:shape" lines of the 472 tensors of the published weights file (the key names of
# pytorch-fid's and torch-fidelity's modules)
KEYS_SHA256 = '954403df03f5a6d824cbccdc11f2b359003e906b126822a8a9a1afc4b6c8b849'


def published_keys():
    keys = {'fc.weight': (1008, 2048), 'fc.bias': (1008,)}
    for line in CONV_TABLE.split('\n'):
        if line:
            name, *shape = line.split()
            keys[f'{name}.conv.weight'] = tuple(map(int, shape))
            for t in ('weight', 'bias', 'running_mean', 'running_var'):
                keys[f'{name}.bn.{t}'] = (int(shape[0]),)
    return keys


def test_inception_keys_equal_published_list():
    keys = published_keys()
    assert len(keys) == fid.FID_NUM_KEYS == 472 and sum(int(np.prod(s)) for s in keys.values()) == 23885392
    digest = hashlib.sha256('\n'.join(f'{k}:{keys[k]}' for k in sorted(keys)).encode()).hexdigest()
    assert digest == KEYS_SHA256  # the literal table above is the published one
    model = fid.FIDInception()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert got == keys
    assert [n for n, m in model.named_children() if any(True for _ in m.parameters())] == [
        'Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3', 'Mixed_5b',
        'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e', 'Mixed_7a',
        'Mixed_7b', 'Mixed_7c', 'fc']


def synthetic_state_dict(seed=0):
    """Random weights with the file's keys, scaled (He init, BN stats near 1) so activations stay O(1)."""
    torch.manual_seed(seed)
    m = fid.FIDInception()
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity='relu')
        elif isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.2)
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    m.fc.weight.data.normal_(0, 0.05)
    m.fc.bias.data.normal_(0, 1.0)  # non-zero on purpose: the Inception Score must not use it
    return m.state_dict()


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """(state_dict, file with num_batches_tracked, file without it)."""
    sd = synthetic_state_dict()
    d = tmp_path_factory.mktemp('weights')
    with_nbt, without = str(d / 'with_nbt.pth'), str(d / 'without_nbt.pth')
    torch.save(sd, with_nbt)
    torch.save({k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}, without)
    return sd, with_nbt, without


@pytest.fixture(scope='module')
def net(synth):
    return fid.load_inception(synth[1])


def test_weights_load_with_and_without_num_batches_tracked(synth):
    sd, with_nbt, without = synth
    assert sum(k.endswith('num_batches_tracked') for k in sd) == 94
    for path in (with_nbt, without):
        model = fid.load_inception(path)  # downloads are blocked by the autouse fixture
        assert not model.training
        got = model.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd if not k.endswith('num_batches_tracked'))


def test_wrong_weights_file_is_a_clear_error(synth, tmp_path):
    sd = {k: v for k, v in synth[0].items() if not k.endswith('num_batches_tracked')}
    cases = {
        'missing': ({k: v for k, v in sd.items() if k != 'Mixed_6d.branch1x1.conv.weight'},
                    '1 missing key(s): Mixed_6d.branch1x1.conv.weight'),
        'renamed': ({('AuxLogits.conv0' + k[13:] if k.startswith('Conv2d_1a_3x3') else k): v
                     for k, v in sd.items()},
                    '5 unexpected key(s): AuxLogits.conv0.bn.bias'),
        'torchvision_fc': ({**sd, 'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)},
                           'fc.weight file (1000, 2048) vs model (1008, 2048)'),
        'not_a_dict': ([1, 2, 3], 'not a state_dict'),
    }
    for name, (obj, msg) in cases.items():
        p = str(tmp_path / f'{name}.pth')
        torch.save(obj, p)
        with pytest.raises(fid.UserError, match=msg.replace('(', r'\(').replace(')', r'\)')):
            fid.load_inception(p)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a torch file')
    with pytest.raises(fid.UserError, match='cannot read'):
        fid.load_inception(str(junk))


def test_weights_from_hub_cache_or_one_checked_download(synth, monkeypatch):
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    with pytest.raises(fid.UserError) as e:  # empty cache, no network: one line saying how to get the file
        fid.find_weights()
    msg = str(e.value)
    assert '\n' not in msg and fid.FID_WEIGHTS_URL in msg and '--weights' in msg and hub in msg
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        os.link(synth[2], dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    path = fid.find_weights()
    assert calls == [(fid.FID_WEIGHTS_URL, fid.FID_WEIGHTS_SHA256)]  # the full SHA-256 is checked
    assert path == os.path.join(hub, fid.FID_WEIGHTS_FILE)
    assert fid.find_weights() == path and len(calls) == 1  # second time: from the cache
    os.rename(path, os.path.join(hub, 'weights-inception-2015-12-05-6726825d.pth'))  # torch-fidelity's name
    assert fid.find_weights().endswith('weights-inception-2015-12-05-6726825d.pth') and len(calls) == 1


def test_missing_weights_file_cli_one_line_error(tmp_path):
    env = {**os.environ, 'TORCH_HOME': str(tmp_path)}
    for name in ('a', 'b'):  # valid images, so that the weights are needed (inputs are checked first)
        np.savez(tmp_path / f'{name}.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    cmd = [sys.executable, os.path.join(HERE, 'fid.py'), 'a.npz', 'b.npz', '--weights',
           str(tmp_path / 'nope.pth')]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ''
    lines = r.stderr.strip().split('\n')
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'nope.pth' in lines[0]
    assert fid.FID_WEIGHTS_URL in lines[0] and '--weights' in lines[0]


def test_forward_shapes_layout_and_batch_independence(net):
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    seen = {}
    hooks = [net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__('b1x1', o)),
             net.Mixed_7c.register_forward_hook(lambda m, i, o: seen.__setitem__('7c', o))]
    try:
        with torch.no_grad():
            pool, spatial, logits = net(fid.preprocess(imgs))
    finally:
        for h in hooks:
            h.remove()
    assert pool.shape == (3, 2048) and spatial.shape == (3, 2023) and logits.shape == (3, 1008)
    assert (pool >= 0).all() and pool.abs().max() > 1e-3
    torch.testing.assert_close(pool, seen['7c'].mean((2, 3)))  # pool_3 = 8x8 average of Mixed_7c
    b = seen['b1x1']  # (3, 192, 17, 17): ADM flattens channels 0..6 of NHWC: index ((i * 17) + j) * 7 + c
    for n, i, j, c in [(0, 0, 0, 0), (1, 3, 16, 6), (2, 16, 2, 4)]:
        assert spatial[n, (i * 17 + j) * 7 + c] == b[n, c, i, j]
    w, bias = net.fc.weight, net.fc.bias
    torch.testing.assert_close(logits, pool @ w.T)  # no bias in the IS logits
    assert (logits - (pool @ w.T + bias)).abs().max() > 0.1
    # batch of 3 == batches of 2 + 1 (eval-mode BN; guards the train-mode bug), deterministic
    parts = fid.inception_features(net, fid.Images(imgs), batch_size=2)
    scale = pool.abs().max().item()
    assert np.abs(parts[0] - pool.numpy()).max() <= 1e-4 * scale
    assert np.abs(parts[1] - spatial.numpy()).max() <= 1e-4 * spatial.abs().max().item()
    big = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    p, s, lg = fid.inception_features(net, fid.Images(np.concatenate([big, big])), batch_size=2)
    assert p.shape == (2, 2048) and s.shape == (2, 2023) and lg.shape == (2, 1008)


def test_basic_conv_is_conv_bn_relu_with_tf_eps():
    torch.manual_seed(1)
    m = fid.BasicConv2d(3, 4, (1, 3), padding=(0, 1)).eval()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(1e-3, 1e-2)  # small variances: eps = 1e-3 (TF) vs 1e-5 (torch default) shows
    m.bn.weight.data.normal_()
    m.bn.bias.data.normal_()
    x = torch.randn(2, 3, 5, 5)
    c = F.conv2d(x, m.conv.weight, padding=(0, 1))
    bn = m.bn
    expect = ((c - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-3)
              * bn.weight[:, None, None] + bn.bias[:, None, None]).clamp_min(0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expect)


def test_fid_specific_pooling():
    x = torch.full((1, 5, 6, 6), 3.0)
    assert torch.equal(fid.tf_avg_pool(x), x)  # border means exclude the zero padding, like TF
    assert F.avg_pool2d(x, 3, 1, 1)[0, 0, 0, 0] == pytest.approx(3.0 * 4 / 9)  # what torchvision's pool does
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    model = fid.FIDInception()
    assert model.Mixed_7b.pool == 'avg' and model.Mixed_7c.pool == 'max'
    e = fid.InceptionE(6, 'max').eval()
    with torch.no_grad():
        assert torch.equal(e(x)[:, -192:], e.branch_pool(F.max_pool2d(x, 3, 1, 1)))
        e.pool = 'avg'
        tf_avg = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        assert torch.allclose(e(x)[:, -192:], e.branch_pool(tf_avg))
        a = fid.InceptionA(6, 8).eval()
        assert torch.allclose(a(x)[:, -8:], a.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        c = fid.InceptionC(6, 4).eval()
        assert torch.allclose(c(x)[:, -192:], c.branch_pool(tf_avg))


def load_golden_maker():
    """tests/fixtures/make_inception_golden.py: its weight rule and inputs (it imports torch-fidelity only in
    main)."""
    spec = importlib.util.spec_from_file_location('make_inception_golden', GOLDEN_MAKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inception_forward_matches_torch_fidelity_golden():
    # torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (an independent TF-compatible port) on the same
    # seeded weights and images: pool_3, ADM's mixed_6/conv spatial features and the IS logits, all values
    mk = load_golden_maker()
    with np.load(GOLDEN) as z:
        golden = {k: z[k] for k in z.files}
    assert 'torch-fidelity' in str(golden['source'])
    model = fid.FIDInception()
    sd = mk.seeded_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert mk.digest([sd[k] for k in sorted(sd)]) == str(golden['weights_sha256'])  # the same weights rebuilt
    images = mk.seeded_inputs()
    assert mk.digest(images) == str(golden['inputs_sha256'])
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
    model.eval()
    with torch.no_grad():
        outs = [model(fid.preprocess(img[None], 'tf')) for img in images]  # 32x32, 64x48 (resized), 299x299
    for i, name in enumerate(('pool', 'spatial', 'logits')):
        got, want = np.concatenate([o[i].numpy() for o in outs]), golden[name]
        assert got.shape == want.shape and np.abs(want).max() > 0.5  # activations did not vanish
        for g, w in zip(got, want):  # per image, relative to its magnitude
            assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max(), (name, np.abs(g - w).max(), np.abs(w).max())


# -----------------------------------------------------------------------------
# preprocessing


def tf1_resize_reference(img, oh, ow, coord=np.float64):
    """Loop over output pixels: TF1 ResizeBilinear (align_corners=False, no half-pixel centres):
    source = dst * in/out (in TF: float32), neighbours floor and floor+1 clamped to the last pixel."""
    h, w = img.shape
    out = np.zeros((oh, ow))
    for i in range(oh):
        y = float(coord(i) * (coord(h) / coord(oh)))
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, h - 1), y - y0
        for j in range(ow):
            x = float(coord(j) * (coord(w) / coord(ow)))
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, w - 1), x - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize('h,w,oh,ow', [(7, 9, 13, 5), (16, 16, 29, 29), (256, 256, 299, 299),
                                       (32, 32, 299, 299)])
def test_tf_resize_matches_numpy_reference(h, w, oh, ow):
    img = np.random.default_rng(h * w).integers(0, 256, (h, w)).astype(np.float64)
    got = fid.tf_resize(torch.tensor(img, dtype=torch.float32)[None, None], (oh, ow))[0, 0].numpy()
    # TF computes source coordinates in float32: same coordinates -> agreement to float32 rounding
    assert np.abs(got - tf1_resize_reference(img, oh, ow, np.float32)).max() < 1e-3
    # exact coordinates: float32 coordinates near 255 are off by ~1e-5 px, i.e. < 1e-2 grey levels
    assert np.abs(got - tf1_resize_reference(img, oh, ow)).max() < 1e-2
    assert got.min() >= img.min() and got.max() <= img.max()


def test_tf_resize_identity_and_affine_ramps():
    x = torch.rand(2, 3, 299, 299) * 255
    assert torch.equal(fid.tf_resize(x), x)
    h, w = 40, 50
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    ramp = torch.tensor(2.0 * yy + 0.5 * xx + 3, dtype=torch.float32)[None, None]
    out = fid.tf_resize(ramp)[0, 0].numpy()
    sy, sx = np.arange(299) * h / 299, np.arange(299) * w / 299
    inner_y, inner_x = sy <= h - 1, sx <= w - 1  # past the last pixel TF clamps: the ramp flattens there
    expect = 2.0 * sy[:, None] + 0.5 * sx[None] + 3
    assert np.abs(out - expect)[np.ix_(inner_y, inner_x)].max() < 1e-3
    assert np.abs(out - expect)[~inner_y].max() > 0.1


def test_preprocess_normalisation_and_torch_mode():
    vals = np.array([0, 128, 255], np.uint8)
    imgs = np.broadcast_to(vals[:, None, None, None], (3, 299, 299, 3))
    tf = fid.preprocess(imgs, 'tf')
    assert tf[:, 0, 0, 0].tolist() == [-1.0, 0.0, 0.9921875]
    pt = fid.preprocess(imgs, 'torch')
    assert pt[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 2 * 128 / 255 - 1, 1.0], abs=1e-6)
    x = np.random.default_rng(7).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    expect = F.interpolate(t, size=(299, 299), mode='bilinear', align_corners=False, antialias=False) * 2 - 1
    torch.testing.assert_close(fid.preprocess(x, 'torch'), expect)
    assert (fid.preprocess(x, 'tf') - expect).abs().max() > 0.05  # the two conventions really differ

# -----------------------------------------------------------------------------
# inputs, reference formats, CLI


class StubInception(nn.Module):
    """FIDInception's interface at ~no cost: fixed random projections of an 8x8 average of the preprocessed
    input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.p, self.s = torch.randn(192, 2048, generator=g), torch.randn(192, 2023, generator=g)
        self.w = torch.randn(2048, 1008, generator=g) * 0.01

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 8).flatten(1)
        pool = torch.relu(f @ self.p)
        return pool, f @ self.s, pool @ self.w


def test_npz_streaming_roundtrip(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (10, 12, 14, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    for save in (np.savez, np.savez_compressed):
        p = str(tmp_path / f'{save.__name__}.npz')
        save(p, arr_0=x, labels=labels)
        imgs = fid.Images(p)
        batches = list(imgs.batches(4))
        assert [len(b) for b in batches] == [4, 4, 2] and imgs.n == 10  # nothing dropped
        assert np.array_equal(np.concatenate(batches), x) and np.array_equal(imgs.labels, labels)
    fortran = str(tmp_path / 'fortran.npz')  # column-major arr_0 cannot be streamed: read whole, same batches
    np.savez(fortran, arr_0=np.asfortranarray(x))
    assert np.array_equal(np.concatenate(list(fid.Images(fortran).batches(4))), x)
    grey = str(tmp_path / 'grey.npz')
    np.savez(grey, arr_0=x[..., 0])  # NHW grey -> RGB
    assert np.array_equal(np.concatenate(list(fid.Images(grey).batches(3))), np.repeat(x[..., :1], 3, -1))


def test_folder_and_npz_give_the_same_features(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    x[3] = x[3, :, :, :1]  # stored as grey below: RGB with equal channels
    folder = tmp_path / 'imgs'
    for c in ('cat', 'dog'):
        (folder / c).mkdir(parents=True)
    for i, a in enumerate(x):
        cls = 'cat' if i < 3 else 'dog'
        if i == 3:
            Image.fromarray(a[..., 0], 'L').save(folder / cls / f'{i}.png')
        elif i == 4:
            rgba = np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])
            Image.fromarray(rgba, 'RGBA').save(folder / cls / f'{i}.PNG')
        else:
            Image.fromarray(a).save(folder / cls / f'{i}.png')
    (folder / 'cat' / 'notes.txt').write_text('not an image')
    npz = str(tmp_path / 'x.npz')
    np.savez(npz, arr_0=x)
    imgs = fid.Images(str(folder))
    assert imgs.n == 5 and imgs.labels == ['cat'] * 3 + ['dog'] * 2  # upper-case .PNG found, .txt ignored
    assert np.array_equal(np.concatenate(list(imgs.batches(2))), x)  # L and RGBA become the same RGB
    stub = StubInception()
    a = fid.inception_features(stub, imgs, batch_size=2)
    b = fid.inception_features(stub, fid.Images(npz), batch_size=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    # mixed sizes in a folder: each image resized to 299 on its own
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / 'dog' / 'big.png')
    p, s, lg = fid.inception_features(stub, fid.Images(str(folder)), batch_size=6)
    assert p.shape == (6, 2048) and np.allclose(p[:3], a[0][:3], rtol=1e-5, atol=1e-5 * np.abs(p).max())


def test_reference_formats_and_saved_stats(tmp_path, capsys):
    rng = np.random.default_rng(10)
    samples, refs = (rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    s_path, r_path = str(tmp_path / 's.npz'), str(tmp_path / 'r.npz')
    np.savez(s_path, arr_0=samples)
    np.savez(r_path, arr_0=refs)
    stub = StubInception()
    pool_s = fid.inception_features(stub, fid.Images(samples))[0]
    pool_r, spatial_r, _ = fid.inception_features(stub, fid.Images(refs))
    plain = fid.evaluate(s_path, r_path, model=stub, metrics=('pr',))
    assert (plain['precision'], plain['recall']) == fid.precision_recall(pool_r, pool_s)
    # --save-stats writes float64 statistics of the reference (+ its features for P/R), tagged with the
    # preprocessing
    saved = str(tmp_path / 'saved.npz')
    fid.evaluate(s_path, r_path, model=stub, metrics=(), save_stats_path=saved)
    with np.load(saved) as z:
        assert str(z['features']) == 'inception-tf' and z['mu'].dtype == z['sigma_s'].dtype == np.float64
        want = (*fid.gaussian_stats(pool_r), *fid.gaussian_stats(spatial_r))
        assert all(np.array_equal(z[k], w) for k, w in zip(('mu', 'sigma', 'mu_s', 'sigma_s'), want))
        assert np.array_equal(z['acts'], pool_r)
    res = fid.evaluate(s_path, saved, model=stub, metrics=('pr',))
    assert (res['precision'], res['recall']) == (plain['precision'], plain['recall'])
    with pytest.raises(fid.UserError, match='inception-tf'):  # statistics of another preprocessing: refused
        fid.evaluate(s_path, saved, model=stub, metrics=('fid',), resize='torch')
    # ADM reference batch: stored mu/sigma (whole-dataset statistics) win over the statistics of its arr_0
    # images
    mu, sigma = np.full(2048, 0.5), np.eye(2048) * 2.0
    adm = str(tmp_path / 'adm.npz')
    np.savez(adm, arr_0=refs, mu=mu, sigma=sigma)
    res = fid.evaluate(s_path, adm, model=stub, metrics=('fid', 'sfid', 'pr'))
    # closed form against sigma = 2I: |mu_s - mu|^2 + Tr(S) + 2d - 2 sqrt(2) Tr(S^1/2), and the non-zero
    # eigenvalues of S = X^T X / (n-1) (X: centred features, 6 x 2048) are those of the 6 x 6 Gram matrix X
    # X^T / (n-1)
    xc = pool_s.astype(np.float64) - pool_s.mean(0)
    gram_eig = np.clip(np.linalg.eigvalsh(xc @ xc.T / 5), 0, None)
    expect = ((pool_s.mean(0) - 0.5) ** 2).sum() + gram_eig.sum() + 2 * 2048 \
        - 2 * np.sqrt(2) * np.sqrt(gram_eig).sum()
    assert res['fid'] == pytest.approx(expect, rel=1e-8)
    assert res['precision'] == plain['precision'] and 'sfid' not in res  # P/R from arr_0; no mu_s -> no sFID
    assert 'sFID skipped' in capsys.readouterr().err
    # stats-only reference (pytorch-fid format): FID works, P/R skipped with a note
    only = str(tmp_path / 'only.npz')
    np.savez(only, mu=mu, sigma=sigma)
    res2 = fid.evaluate(s_path, only, model=stub, metrics=('fid', 'pr'))
    assert res2['fid'] == res['fid'] and 'precision' not in res2
    assert 'Precision/Recall skipped' in capsys.readouterr().err


def test_cli_end_to_end_with_synthetic_weights(synth, net, tmp_path, capsys):
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / 'samples.npz', arr_0=x)
    (tmp_path / 'ref').mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a).save(tmp_path / 'ref' / f'{i:03d}.png')
    out = str(tmp_path / 'res.json')
    rc = fid.main([str(tmp_path / 'samples.npz'), str(tmp_path / 'ref'), '--weights', synth[1], '--json', out,
                   '--batch-size', '3', '--device', 'cpu'])
    assert rc == 0
    lines = capsys.readouterr().out.strip().split('\n')
    assert [ln.split(':')[0] for ln in lines] == ['Inception Score', 'FID', 'sFID', 'Precision', 'Recall']
    res = json.load(open(out))
    assert {'is', 'is_std', 'fid', 'sfid', 'precision', 'recall', 'n_samples', 'n_ref', 'resize'} <= set(res)
    assert abs(res['fid']) < 1e-9 and abs(res['sfid']) < 1e-9  # FID(x, x) ~ 0: folder and npz agree
    assert res['precision'] == res['recall'] == 1.0 and res['n_samples'] == res['n_ref'] == 4
    # the Inception Score by hand: p(y|x) = softmax(pool @ fc.weight^T) (no bias), one split (4 < 5000),
    # IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the split
    with torch.no_grad():
        pool = net(fid.preprocess(x))[0].double().numpy()
    logits = pool @ synth[0]['fc.weight'].double().numpy().T
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(logp)
    expect = np.exp((p * (logp - np.log(p.mean(0)))).sum(1).mean())
    # the random fc weights make the 4 predictions differ little (IS - 1 ~ 3e-4), so compare IS - 1 (the
    # KL part) to 0.1%: 1.0, or any IS within [1, 4] that is not this one, fails
    assert 1e-4 < expect - 1 < 1e-2
    assert res['is'] - 1 == pytest.approx(expect - 1, rel=1e-3) and res['is_std'] == 0.0


def test_guard_rails(tmp_path, capsys):
    np.savez(tmp_path / 'one.npz', arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(fid.UserError, match='at least 2'):
        fid.Images(str(tmp_path / 'one.npz'))
    np.savez(tmp_path / 'float.npz', arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(fid.UserError, match='uint8'):
        fid.Images(str(tmp_path / 'float.npz'))
    few = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / 'few.npz', arr_0=few)
    fid.evaluate(str(tmp_path / 'few.npz'), model=StubInception(), metrics=('is',))
    assert '< 2048' in capsys.readouterr().err
    assert fid.main([str(tmp_path / 'float.npz'), '--weights', str(tmp_path / 'none.pth')]) == 2


def test_help_documents_every_flag():
    parser = fid.build_parser()
    r = subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), '--help'], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.dest
        for opt in action.option_strings or [action.dest]:
            assert opt in r.stdout


def test_fid_py_runs_alone(synth, tmp_path):
    # fid.py copied into an empty folder (no data.py, common.py): --help, and an Inception FID between two .npz
    # files
    alone = tmp_path / 'alone'
    alone.mkdir()
    shutil.copy(os.path.join(HERE, 'fid.py'), alone / 'fid.py')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['TORCH_HOME'] = str(tmp_path / 'torch_home')

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=alone,
                              timeout=300)
    site = [p for p in sys.path if p.endswith('-packages')]  # what the child imports besides its own folder
    assert os.listdir(alone) == ['fid.py']
    assert all(importlib.machinery.PathFinder.find_spec(m, site) is None for m in ('tokenizer', 'data', 'common'))
    assert run('fid.py', '--help').returncode == 0
    rng = np.random.default_rng(20)
    a, b = (rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8) for _ in range(2))
    np.savez(alone / 'a.npz', arr_0=a)
    np.savez(alone / 'b.npz', arr_0=b)
    r = run('fid.py', 'a.npz', 'b.npz', '--weights', synth[2], '--metrics', 'fid,is', '--json', 'res.json',
            '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    got = json.load(open(alone / 'res.json'))
    net = fid.load_inception(synth[2])
    pa, _, la = fid.inception_features(net, fid.Images(a))
    pb = fid.inception_features(net, fid.Images(b))[0]
    expect = fid.frechet_distance(*fid.gaussian_stats(pa), *fid.gaussian_stats(pb))
    assert expect > 0.1 and got['fid'] == pytest.approx(expect, rel=1e-4)
    assert got['is'] == pytest.approx(fid.inception_score(la)[0], rel=1e-4)
    r = run('fid.py', 'a.npz', 'toy', '--weights', synth[2])  # a dataset spec needs data.py: one line
    assert r.returncode == 2 and r.stderr.strip().split('\n') == [r.stderr.strip()]
    assert r.stderr.startswith("error: reading the dataset 'toy' needs data.py and common.py")


def cli_error(tmp_path, capsys, *inputs):
    """Run the CLI on bad inputs: one line 'error: ...', exit 2, quickly, no output file, no weights
    needed."""
    res, stats = tmp_path / 'out' / 'res.json', tmp_path / 'out' / 'stats.npz'
    t0 = time.time()
    rc = fid.main([*map(str, inputs), '--weights', str(tmp_path / 'absent.pth'), '--json', str(res),
                   '--save-stats', str(stats), '--device', 'cpu'])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == '' and time.time() - t0 < 20
    errors = [ln for ln in cap.err.split('\n') if ln.startswith('error:')]
    assert len(errors) == 1 and cap.err.rstrip('\n').split('\n')[-1] == errors[0]
    assert 'absent.pth' not in errors[0]  # refused before the Inception weights were looked for
    assert not res.exists() and not stats.exists() and not list(tmp_path.rglob('*.tmp'))
    return errors[0]


def test_image_array_layouts(tmp_path, capsys):
    rng = np.random.default_rng(21)
    x = rng.integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    stub = StubInception()
    want = fid.inception_features(stub, fid.Images(x), batch_size=2)
    rgba = np.concatenate([x, np.full((5, 12, 10, 1), 9, np.uint8)], -1)
    grey = x[..., :1]
    grey3 = np.repeat(grey, 3, -1)
    cases = {'nchw': (x.transpose(0, 3, 1, 2), x), 'nhwc_rgba': (rgba, x),
             'nchw_rgba': (rgba.transpose(0, 3, 1, 2), x), 'nchw_grey': (grey.transpose(0, 3, 1, 2), grey3),
             'nhw': (grey[..., 0], grey3)}
    for name, (arr, expect) in cases.items():
        p = str(tmp_path / f'{name}.npz')
        np.savez(p, arr_0=arr)
        imgs = fid.Images(p)
        assert imgs.n == 5 and imgs.size == 12, name
        assert np.array_equal(np.concatenate(list(imgs.batches(2))), expect), name
        assert np.array_equal(np.concatenate(list(fid.Images(arr).batches(3))), expect), name  # an array too
    got = fid.inception_features(stub, fid.Images(str(tmp_path / 'nchw.npz')), batch_size=2)
    assert all(np.array_equal(u, v) for u, v in zip(got, want))
    np.savez(tmp_path / 'nhwc.npz', arr_0=x)
    res = fid.evaluate(str(tmp_path / 'nchw.npz'), str(tmp_path / 'nhwc.npz'), model=stub, metrics=('fid',))
    assert abs(res['fid']) < 1e-6
    for name, arr in {'nhwc2': x[..., :2], 'nchw2': x[..., :2].transpose(0, 3, 1, 2), 'five': rng.integers(
            0, 256, (5, 12, 10, 5), dtype=np.uint8), 'single_image': x[0], 'flat': x.reshape(5, -1)}.items():
        np.savez(tmp_path / f'{name}.npz', arr_0=arr)
        msg = cli_error(tmp_path, capsys, tmp_path / f'{name}.npz')
        assert f'{name}.npz: arr_0' in msg and str(arr.shape) in msg and '(N, H, W, C)' in msg, msg


def test_corrupt_images_in_a_folder_are_skipped(tmp_path, capsys):
    rng = np.random.default_rng(22)
    x = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    folder = tmp_path / 'imgs'
    for i, a in enumerate(x):
        (folder / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f'c{i % 2}' / f'{i}.png')
    (folder / 'c0' / '1_garbage.png').write_bytes(b'not an image' * 20)  # PIL cannot identify it
    data = (folder / 'c1' / '1.png').read_bytes()
    (folder / 'c1' / '2_truncated.png').write_bytes(data[:len(data) // 2])  # header fine, pixels cut off
    imgs = fid.Images(str(folder))
    err = capsys.readouterr().err
    assert imgs.n == 5 and err.count('\n') == 1 and err.startswith('warning: skipped 1 unreadable')
    assert '1_garbage' in err
    order = [0, 2, 1, 3]  # sorted: c0/0, c0/2, c1/1, c1/3
    assert np.array_equal(np.concatenate(list(imgs.batches(2))), x[order])
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('warning: skipped unreadable image')
    assert '2_truncated' in err
    assert imgs.labels == ['c0', 'c0', 'c1', 'c1']  # the truncated file's label left out with it
    stub = StubInception()
    np.savez(tmp_path / 'good.npz', arr_0=x[order])
    got = fid.inception_features(stub, fid.Images(str(folder)), batch_size=3)
    want = fid.inception_features(stub, fid.Images(str(tmp_path / 'good.npz')), batch_size=3)
    assert all(np.array_equal(u, v) for u, v in zip(got, want))
    bad = tmp_path / 'bad'
    bad.mkdir()
    for i in range(3):
        (bad / f'{i}.png').write_bytes(b'junk')
    assert 'no readable images' in cli_error(tmp_path, capsys, bad)
    for i in range(3):
        (bad / f'{i}.png').write_bytes(data[:len(data) // 2])
    with pytest.raises(fid.UserError, match='only 0 of 3 images could be decoded'):
        fid.evaluate(str(bad), model=stub, metrics=('is',))


def test_bad_statistics_files(tmp_path, capsys):
    rng = np.random.default_rng(23)
    np.savez(tmp_path / 's.npz', arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    mu, sigma = np.zeros(2048), np.eye(2048)
    np.savez(tmp_path / 'no_sigma.npz', mu=mu)
    msg = cli_error(tmp_path, capsys, tmp_path / 's.npz', tmp_path / 'no_sigma.npz')
    assert "missing 'sigma'" in msg and 'no_sigma.npz' in msg
    np.savez(tmp_path / 'half_spatial.npz', mu=mu, sigma=sigma, mu_s=np.zeros(2023))
    s = tmp_path / 's.npz'
    assert "missing 'sigma_s'" in cli_error(tmp_path, capsys, s, tmp_path / 'half_spatial.npz')
    np.savez(tmp_path / 'only_sigma.npz', sigma=sigma)
    assert "missing 'mu'" in cli_error(tmp_path, capsys, tmp_path / 'only_sigma.npz', tmp_path / 's.npz')
    np.savez(tmp_path / 'shapes.npz', mu=mu, sigma=np.eye(16))
    assert "'sigma' of shape (16, 16)" in cli_error(tmp_path, capsys, s, tmp_path / 'shapes.npz')
    (tmp_path / 'text.npz').write_text('not a zip')
    assert 'cannot read' in cli_error(tmp_path, capsys, tmp_path / 'text.npz', tmp_path / 's.npz')
    assert 'missing.npz not found' in cli_error(tmp_path, capsys, s, tmp_path / 'missing.npz')


def test_nonfinite_statistics_are_refused_before_any_feature(tmp_path, capsys):
    # a stats file with NaN or inf: one line naming the file and the array, before the Inception weights are
    # looked for (cli_error passes an absent weights file) and before anything is written
    rng = np.random.default_rng(26)
    s = tmp_path / 's.npz'
    np.savez(s, arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    acts = rng.normal(size=(30, 16))
    good = dict(mu=acts.mean(0), sigma=np.cov(acts, rowvar=False), mu_s=acts[:, :4].mean(0),
                sigma_s=np.cov(acts[:, :4], rowvar=False), acts=acts)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        one = np.cov(acts[:1], rowvar=False)  # what numpy (and pytorch-fid) give for a single image: all NaN
    cases = {'nan_sigma': ('sigma', np.where(np.eye(16, dtype=bool), np.nan, good['sigma']), '16 NaN, 0 inf'),
             'inf_mu': ('mu', np.r_[np.inf, good['mu'][1:]], '0 NaN, 1 inf of 16'),
             'nan_mu_s': ('mu_s', np.full(4, np.nan), '4 NaN'),
             'inf_sigma_s': ('sigma_s', np.where(np.eye(4, dtype=bool), -np.inf, 0.0), '0 NaN, 4 inf of 16'),
             'nan_acts': ('acts', np.where(np.arange(16) == 7, np.nan, acts), '30 NaN, 0 inf of 480'),
             'one_image': ('sigma', one, '256 NaN, 0 inf of 256')}
    for name, (key, arr, count) in cases.items():
        np.savez(tmp_path / f'{name}.npz', **{**good, key: arr})
        for args in ((s, tmp_path / f'{name}.npz'), (tmp_path / f'{name}.npz', s)):  # as REF and as SAMPLES
            msg = cli_error(tmp_path, capsys, *args)
            assert f"{name}.npz: '{key}' holds NaN or inf (" in msg and 'recompute' in msg, msg
            assert count in msg, msg
            assert ('fewer than 2 images' in msg) == key.startswith('sigma'), msg
    assert "'sigma' holds NaN or inf (16 NaN, 0 inf of 256 values)" in cli_error(
        tmp_path, capsys, s, tmp_path / 'nan_sigma.npz')
    np.savez(tmp_path / 'text_mu.npz', mu=np.array(['a'] * 16), sigma=good['sigma'])
    assert "'mu' holds <U1 values, not numbers" in cli_error(tmp_path, capsys, s, tmp_path / 'text_mu.npz')
    # two stats files: refused the same way, nothing printed as a score
    np.savez(tmp_path / 'good.npz', **good)
    assert "inf_mu.npz: 'mu'" in cli_error(tmp_path, capsys, tmp_path / 'good.npz', tmp_path / 'inf_mu.npz')


class NaNStub(nn.Module):
    """StubInception whose features turn NaN for an image that is all zeros (a stand-in for weights with NaN)."""

    def __init__(self):
        super().__init__()
        self.stub = StubInception()

    def forward(self, x):
        outs = self.stub(x)
        dead = (x == -1).flatten(1).all(1)[:, None]  # (0 - 128) / 128 = -1 everywhere
        return tuple(torch.where(dead, torch.nan, o) for o in outs)


def test_nonfinite_features_are_an_error_not_a_score(tmp_path, capsys):
    rng = np.random.default_rng(27)
    x = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    y = x.copy()
    y[3] = 0
    np.savez(tmp_path / 'x.npz', arr_0=x)
    np.savez(tmp_path / 'y.npz', arr_0=y)
    stats = tmp_path / 'stats.npz'
    for samples, ref in (('y', 'x'), ('x', 'y'), ('y', None)):
        with pytest.raises(fid.UserError, match=r"y.npz: the Inception pool features are not finite "
                                                r"\(2048 NaN, 0 inf of 10240 values\)"):
            fid.evaluate(str(tmp_path / f'{samples}.npz'), ref and str(tmp_path / f'{ref}.npz'), model=NaNStub(),
                         save_stats_path=str(stats))
        assert not stats.exists()
    res = fid.evaluate(str(tmp_path / 'x.npz'), str(tmp_path / 'x.npz'), model=NaNStub(), metrics=('fid',))
    assert abs(res['fid']) < 1e-6  # the stub itself is fine on images that are not all black


def test_nonfinite_metric_is_never_printed(tmp_path, capsys, monkeypatch):
    # the last line of defence: a metric that comes out NaN or inf from inputs that passed every check
    rng = np.random.default_rng(28)
    np.savez(tmp_path / 'x.npz', arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr(fid, 'inception_score', lambda logits: (float('nan'), 0.0))
    with pytest.raises(fid.UserError, match=r'non-finite result\(s\): Inception Score = nan: a numerical'):
        fid.evaluate(str(tmp_path / 'x.npz'), model=StubInception(), metrics=('is', 'fid'))
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: StubInception())
    js = tmp_path / 'res.json'
    assert fid.main([str(tmp_path / 'x.npz'), '--json', str(js)]) == 2
    out, err = capsys.readouterr()
    assert out == '' and not js.exists()
    assert err.strip().split('\n')[-1] == 'error: non-finite result(s): Inception Score = nan: a numerical ' \
        'failure, not a score'
    monkeypatch.setattr(fid, 'precision_recall', lambda *a, **k: (0.5, float('inf')))
    monkeypatch.setattr(fid, 'inception_score', lambda logits: (2.0, float('nan')))
    with pytest.raises(fid.UserError, match=r'non-finite result\(s\): is_std = nan, Recall = inf: '):
        fid.evaluate(str(tmp_path / 'x.npz'), str(tmp_path / 'x.npz'), model=StubInception())


def fd_to_isotropic(pool, mu, c):
    """FID between the Gaussian of pool (n x 2048, n small) and N(mu, c I) in closed form: |m - mu|^2 + Tr(S)
    + c d
    - 2 sqrt(c) Tr(S^1/2); the non-zero eigenvalues of S = X^T X / (n-1) are those of the n x n X X^T /
    (n-1)."""
    xc = pool.astype(np.float64) - pool.mean(0)
    eig = np.clip(np.linalg.eigvalsh(xc @ xc.T / (len(pool) - 1)), 0, None)
    return ((pool.mean(0) - mu) ** 2).sum() + eig.sum() + c * pool.shape[1] - 2 * np.sqrt(c * eig).sum()


def test_samples_with_images_and_stats_use_the_images(tmp_path):
    rng = np.random.default_rng(24)
    x, y = (rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    junk = dict(mu=np.full(2048, 5.0), sigma=np.eye(2048) * 3, mu_s=np.ones(2023), sigma_s=np.eye(2023))
    np.savez(tmp_path / 'both.npz', arr_0=x, **junk)  # e.g. a samples file someone added statistics to
    np.savez(tmp_path / 'y.npz', arr_0=y)
    np.savez(tmp_path / 'ref_stats.npz', mu=np.full(2048, 0.5), sigma=np.eye(2048) * 2)
    stub = StubInception()
    pool, _, logits = fid.inception_features(stub, fid.Images(x))
    pool_y = fid.inception_features(stub, fid.Images(y))[0]
    res = fid.evaluate(str(tmp_path / 'both.npz'), str(tmp_path / 'ref_stats.npz'), model=stub,
                       metrics=('is', 'fid'))
    assert res['n_samples'] == 6 and res['is'] == fid.inception_score(logits)[0]  # IS from arr_0, as ADM
    assert res['fid'] == pytest.approx(fd_to_isotropic(pool, 0.5, 2.0), rel=1e-6)  # the images', not junk
    # as the reference the same file's stored statistics win (an ADM reference batch); its images serve P/R
    res = fid.evaluate(str(tmp_path / 'y.npz'), str(tmp_path / 'both.npz'), model=stub, metrics=('fid', 'pr'))
    assert res['fid'] == pytest.approx(fd_to_isotropic(pool_y, 5.0, 3.0), rel=1e-6)
    assert (res['precision'], res['recall']) == fid.precision_recall(pool, pool_y)


def test_two_stats_files_need_no_weights(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(25)
    acts = [rng.normal(size=(30, 16)) + i for i in range(2)]
    spatial = [rng.normal(size=(30, 8)) * (1 + i) for i in range(2)]
    for i, name in enumerate(('s', 'r')):
        st = dict(zip(('mu', 'sigma'), fid.gaussian_stats(acts[i])))
        st.update(zip(('mu_s', 'sigma_s'), fid.gaussian_stats(spatial[i])))
        np.savez(tmp_path / f'{name}.npz', acts=acts[i], **st)
        np.savez(tmp_path / f'{name}_fid_only.npz', mu=st['mu'], sigma=st['sigma'])
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: pytest.fail('Inception weights were loaded'))
    out = str(tmp_path / 'res.json')
    rc = fid.main([str(tmp_path / 's.npz'), str(tmp_path / 'r.npz'), '--weights', 'absent.pth',
                   '--json', out])
    assert rc == 0
    res = json.load(open(out))
    fd = fid.frechet_distance(*fid.gaussian_stats(acts[0]), *fid.gaussian_stats(acts[1]))
    assert res['fid'] == pytest.approx(fd)
    assert res['sfid'] == pytest.approx(
        fid.frechet_distance(*fid.gaussian_stats(spatial[0]), *fid.gaussian_stats(spatial[1])))
    assert (res['precision'], res['recall']) == fid.precision_recall(acts[1], acts[0]) and 'is' not in res
    assert 'Inception Score skipped' in capsys.readouterr().err
    res = fid.evaluate(str(tmp_path / 's_fid_only.npz'), str(tmp_path / 'r.npz'))  # no model argument either
    assert res['fid'] == pytest.approx(fd)
    assert 'sfid' not in res and 'precision' not in res
    err = capsys.readouterr().err
    assert 'sFID skipped' in err and 'Precision/Recall skipped' in err


# -----------------------------------------------------------------------------
# the domain classifier


def line_images(n, size, seed):
    """4 classes of thin bright lines on dark noise: horizontal, vertical, diagonal, anti-diagonal."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    idx = np.arange(size)
    for i, c in enumerate(y):
        p = rng.integers(2, size - 2)
        rows, cols = [(np.full(size, p), idx), (idx, np.full(size, p)), (idx, (idx + p) % size),
                      (idx, (p - idx) % size)][c]
        x[i, rows, cols] = rng.integers(200, 256, 3)
    return x, y


def blur(x):
    blurred = gaussian_filter(x.astype(np.float64), sigma=(0, 1, 1, 0))
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(13).normal(size=(2, 3, 12, 10))
    for sigma in (0.3, 1.0):
        got = fid.gaussian_blur(torch.tensor(x), sigma).numpy()
        # same 7 taps (radius = int(truncate * sigma + 0.5) = 3), 'nearest' = replicated edges
        expect = gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode='nearest', truncate=3 / sigma)
        np.testing.assert_allclose(got, expect, atol=1e-12)


def test_domain_classifier_end_to_end(tmp_path, capsys):
    data = str(tmp_path / 'lines.npz')
    np.savez(data, images=line_images(480, 16, 0)[0], labels=line_images(480, 16, 0)[1])  # tokenizer's format
    clf = str(tmp_path / 'clf.pt')
    assert fid.main(['--train-classifier', data, '--out', clf, '--image-size', '16', '--steps', '120']) == 0
    assert 'held-out accuracy' in capsys.readouterr().out
    x, y = line_images(400, 16, 1)  # fresh "samples" with the class each was drawn for
    np.savez(tmp_path / 'a.npz', arr_0=x[:200], labels=y[:200])
    np.savez(tmp_path / 'b.npz', arr_0=x[200:], labels=y[200:])
    np.savez(tmp_path / 'b_blur.npz', arr_0=blur(x[200:]), labels=y[200:])
    np.savez(tmp_path / 'b_wrong.npz', arr_0=x[200:], labels=(y[200:] + 1) % 4)
    np.savez(tmp_path / 'b_big.npz', arr_0=x[200:].repeat(2, 1).repeat(2, 2), labels=y[200:])  # 32 px
    p = {k: str(tmp_path / f'{k}.npz') for k in ('a', 'b', 'b_blur', 'b_wrong', 'b_big')}
    real = fid.domain_metrics(p['b'], p['a'], clf)
    blurred = fid.domain_metrics(p['b_blur'], p['a'], clf)
    assert real['acc'] >= 0.9 and real['ref_acc'] >= 0.9 and real['n_samples'] == real['n_ref'] == 200
    assert blurred['fid'] > 3 * real['fid']
    assert fid.domain_metrics(p['b_wrong'], clf_path=clf)['acc'] <= 0.1
    big = fid.domain_metrics(p['b_big'], p['a'], clf)
    assert big['acc'] >= 0.8 and big['fid'] < blurred['fid']
    # labels from per-class folders named like the classifier's classes
    for i, (a, c) in enumerate(zip(x[200:], y[200:])):
        os.makedirs(tmp_path / 'per_class' / str(c), exist_ok=True)
        Image.fromarray(a).save(tmp_path / 'per_class' / str(c) / f'{i}.png')
    folder = fid.domain_metrics(str(tmp_path / 'per_class'), p['a'], clf)
    assert folder['acc'] == pytest.approx(real['acc'])  # same images, order differs
    # reference as a dataset spec, saved stats round trip, and feature-space checks
    st = str(tmp_path / 'ref_stats.npz')
    ds_ref = fid.domain_metrics(p['b'], data, clf, ref_split='val', save_stats_path=st)
    assert ds_ref['n_ref'] == 24
    assert fid.domain_metrics(p['b'], st, clf)['fid'] == pytest.approx(ds_ref['fid'], rel=1e-12)
    with pytest.raises(fid.UserError, match='domain-'):
        fid.evaluate(p['b'], st, model=StubInception(), metrics=('fid',))
    np.savez(tmp_path / 'inception_stats.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(fid.UserError, match="'inception' features"):
        fid.domain_metrics(p['b'], str(tmp_path / 'inception_stats.npz'), clf)
    js = str(tmp_path / 'd.json')
    assert fid.main([p['b'], p['a'], '--features', clf, '--json', js]) == 0
    assert capsys.readouterr().out.split('\n')[:3] == [f"FID: {real['fid']}", f"Accuracy: {real['acc']}",
                                                       f"Reference accuracy: {real['ref_acc']}"]
    assert json.load(open(js))['fid'] == real['fid']


def test_domain_nonfinite_weights_and_statistics(tmp_path, capsys):
    torch.manual_seed(0)
    model = fid.DomainCNN(4, 16, 4)
    ck = dict(model=model.state_dict(), num_classes=4, image_size=16, width=4, class_names=list('abcd'))
    clf, bad_clf = str(tmp_path / 'clf.pt'), str(tmp_path / 'bad_clf.pt')
    torch.save(ck, clf)
    sd = {k: v.clone() for k, v in ck['model'].items()}
    sd['body.0.weight'][0, 0, 1, 1] = torch.nan  # a diverged training run
    torch.save({**ck, 'model': sd}, bad_clf)
    x, y = line_images(12, 16, 3)
    np.savez(tmp_path / 'a.npz', arr_0=x, labels=y)
    # one NaN weight in the first conv reaches every feature of every image (the next layers mix channels)
    with pytest.raises(fid.UserError, match=r"a.npz: the classifier's features are not finite \(192 NaN, 0 inf "
                                            r"of 192 values\): its weights hold NaN"):
        fid.domain_metrics(str(tmp_path / 'a.npz'), clf_path=bad_clf)
    tag = fid.load_classifier(clf)[2]
    feats = np.random.default_rng(0).normal(size=(20, 16))
    sigma = np.cov(feats, rowvar=False)
    sigma[2, 5] = np.nan
    np.savez(tmp_path / 'nan_stats.npz', features=np.array(tag), mu=feats.mean(0), sigma=sigma)
    msg = cli_error(tmp_path, capsys, tmp_path / 'a.npz', tmp_path / 'nan_stats.npz', '--features', clf)
    assert "nan_stats.npz: 'sigma' holds NaN or inf (1 NaN, 0 inf of 256 values)" in msg
    res = fid.domain_metrics(str(tmp_path / 'a.npz'), str(tmp_path / 'a.npz'), clf)
    assert abs(res['fid']) < 1e-9 and 0 <= res['acc'] <= 1  # the good classifier works on the same inputs


@pytest.mark.skipif(not os.path.isdir(MNIST), reason='MNIST not found: set MNIST=<folder with the IDX files>')
def test_domain_classifier_reads_mnist(tmp_path):
    clf = str(tmp_path / 'clf.pt')
    acc = fid.train_classifier(MNIST, clf, image_size=32, steps=100)
    assert acc >= 0.9  # 100 steps (96% measured); the default 600 steps reach 98.6%
    ck = torch.load(clf, weights_only=True)
    assert ck['num_classes'] == 10 and ck['image_size'] == 32
    assert ck['class_names'] == [str(i) for i in range(10)]


@pytest.mark.parametrize('flag', ['--json', '--save-stats', '--out'])
def test_output_paths_are_checked_before_any_work(tmp_path, capsys, flag):
    """An output that cannot be written (a path under a regular file) is refused in one line before the
    inputs are read, the weights looked up or a classifier trained: the inputs here do not even exist."""
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    bad = str(blocker / 'sub' / 'x.out')
    argv = ['--train-classifier', str(tmp_path / 'nope'), '--out', bad] if flag == '--out' else \
        [str(tmp_path / 'nope.npz'), str(tmp_path / 'nope2.npz'), '--weights', str(tmp_path / 'absent.pth'), flag, bad]
    assert fid.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {flag} ') and 'cannot be written' in err and '\n' not in err, err


@pytest.mark.parametrize('device, needle', [('cuda:99', '--device cuda:99: not available on this machine'),
                                            ('nonsense', "--device 'nonsense' is not a torch device")])
def test_a_device_the_machine_lacks_is_one_line_before_any_work(tmp_path, capsys, device, needle):
    # used to be a traceback from deep inside the first model.to(device)
    rc = fid.main(['--train-classifier', 'toy', '--out', str(tmp_path / 'c.pt'), '--device', device])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and needle in err, err
    assert os.listdir(tmp_path) == []
