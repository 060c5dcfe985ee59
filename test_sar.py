"""Tests of sar.py and tokenizer.py. The fixture tests compare with tensors computed by the official code
(tests/fixtures/flexvar_tiny.pt, see its README); the rest check invariants and closed forms."""

import ast
import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import cpu_speed
import data
import sar
import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'tests', 'fixtures', 'flexvar_tiny.pt')
sys.path.insert(0, os.path.join(HERE, 'experiments'))
import bench  # noqa: E402
import diagnose  # noqa: E402
import naive_sf  # noqa: E402


@pytest.fixture(scope='module')
def fx():
    return torch.load(FIXTURE)


def fixture_vae(fx):
    c = fx['vae_config']
    vae = tokenizer.VQVAE(codebook_size=c['codebook_size'], codebook_dim=c['codebook_embed_dim'],
                          z_channels=c['z_channels'], ch=c['base_ch'], ch_mult=c['encoder_ch_mult'],
                          num_res_blocks=c['num_res_blocks'])
    vae.load_state_dict(fx['vae_state_dict'], strict=True)
    return vae.eval().requires_grad_(False)


def fixture_var(fx):
    sd = sar.extract_state_dict(fx['var_state_dict'])
    model = sar.FlexVAR(**sar.config_from_state_dict(sd))
    common.load_state_dict_strict(model, sd, 'fixture')
    return model.eval()


def opts(*argv):
    return sar.resolve_args(sar.get_parser().parse_args(list(argv)))


def loss_of(model, vae, gt, x, labels, scales, o, gen=None):
    """The training loss of the options `o` (what sar.py's loop calls), for the official 1000 classes."""
    return sar.loss_for(o, vae, model.num_classes)(model, gt, x, labels, scales, gen)


# ---------------------------------------------------------------------------------------------------------
# the transformer against the official code
# ---------------------------------------------------------------------------------------------------------

def test_fixture_var_state_dict_loads_strictly(fx):
    sd = sar.extract_state_dict(fx['var_state_dict'])
    assert 'attn_bias_for_masking' not in sd                       # the stale mask is dropped
    model = fixture_var(fx)
    assert set(model.state_dict()) == set(sd)
    assert model.config == dict(depth=2, vocab_size=512, num_classes=1000, codebook_dim=32)
    # both official layouts and ours give the same state_dict
    for wrapped in ({'trainer': {'var_wo_ddp': fx['var_state_dict']}}, {'model': fx['var_state_dict']}):
        assert set(sar.extract_state_dict(wrapped)) == set(sd)


def test_fixture_tf_logits_and_mask(fx):
    model = fixture_var(fx)
    with torch.no_grad():
        logits = model(fx['labels'], fx['tf_input'], fx['scales'])
        uncond = model(fx['tf_logits_uncond_labels'], fx['tf_input'], fx['scales'])
    torch.testing.assert_close(logits, fx['tf_logits'], atol=1e-4, rtol=0)
    torch.testing.assert_close(uncond, fx['tf_logits_uncond'], atol=1e-4, rtol=0)
    m = sar.block_causal_mask(fx['scales'])           # the official additive form: 0 allowed, -inf masked
    assert torch.equal(torch.zeros(m.shape).masked_fill_(~m, float('-inf'))[None, None], fx['attn_bias'])


def test_fixture_sf_logits(fx):
    """The official student-forcing pass (transition 5 -> 8, argmax tokens of scale 5) in its two halves: our
    upsampled input equals the official `sf_input`, our forward on the official input gives the official
    `sf_logits`, and sar.student_pass (both halves together) gives them too."""
    model, vae = fixture_var(fx), fixture_vae(fx)
    k, scales = fx['sf_scale_index'], fx['scales']
    a, b = sar.begin_ends(scales)[k]
    src = sar.ssr_draw(model, fx['tf_logits'], fx['tf_input'], fx['labels'], model.num_classes, scales, [k],
                       sar.SFDraw('argmax'))[k]
    assert torch.equal(src, fx['sf_src_idx']) and torch.equal(src, fx['tf_logits'][:, a:b].argmax(-1))
    assert fx['sf_patch_nums'] == [1, scales[k + 1]] == [1, 8]
    with torch.no_grad():
        torch.testing.assert_close(sar.scale_shift(vae, src, scales[k], scales[k + 1]), fx['sf_input'],
                                   atol=1e-4, rtol=0)
        direct = model(fx['labels'], fx['sf_input'], fx['sf_patch_nums'], first_pos=False)[:, 1:]
        logits, which = sar.student_pass(model, vae, fx['labels'], {k: src}, scales, 'last')
    torch.testing.assert_close(direct, fx['sf_logits'], atol=1e-4, rtol=0)
    assert which == [len(scales) - 1]
    torch.testing.assert_close(logits, fx['sf_logits'], atol=1e-4, rtol=0)
    # pos_start stays off the class token in this pass (as in the official code): with it, the logits move
    with torch.no_grad():
        with_pos = model(fx['labels'], fx['sf_input'], fx['sf_patch_nums'])[:, 1:]
    assert (with_pos - fx['sf_logits']).abs().max() > 1e-3


@pytest.mark.parametrize('mode', ['tf', 'sar'])
def test_fixture_training_step_losses_and_grad_norms(fx, mode):
    """One official step (argmax SF, last transition, teacher target, gamma 0.01, no dropout)."""
    ref = fx['train_step']
    model, vae = fixture_var(fx), fixture_vae(fx)
    o = opts('--mode', mode, '--cond-drop', '0', '--sf-input', 'argmax', '--gamma', str(ref['sigma']))
    gt, x = sar.gt_tokens_and_inputs(vae, fx['images'], fx['scales'])
    loss, info = loss_of(model, vae, gt, x, fx['labels'], fx['scales'], o)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    if mode == 'tf':
        assert loss.item() == pytest.approx(ref['tf_loss'], rel=1e-4)
        assert gn.item() == pytest.approx(ref['tf_grad_norm'], rel=1e-4)
    else:
        assert info['loss_tf'].item() == pytest.approx(ref['csfl_tf_loss'], rel=1e-4)
        assert info['loss_csf'].item() == pytest.approx(ref['csfl_sf_loss'], rel=1e-4)
        assert loss.item() == pytest.approx(ref['csfl_total_loss'], rel=1e-4)
        assert gn.item() == pytest.approx(ref['csfl_grad_norm'], rel=1e-4)


@pytest.mark.parametrize('form,key', [('var', 'var_cfg'), ('llamagen', 'llamagen_cfg')])
def test_fixture_greedy_cfg_sampling(fx, form, key):
    ai, ref = fx['ar_infer'], fx['ar_infer'][key]
    model, vae = fixture_var(fx), fixture_vae(fx)
    assert ai['max_pn'] == 16                      # the official sampler's, fixed in ours
    idx, logits = sar.generate_tokens(model, vae, fx['labels'], ai['infer_patch_nums'], cfg=ai['cfg'],
                                      top_k=ai['top_k'], top_p=ai['top_p'], cfg_form=form)
    for a, b in zip(idx, ref['indices_per_scale']):
        assert torch.equal(a, b)
    for a, b in zip(logits, ref['cfg_logits_per_scale']):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    img = sar.sample(model, vae, fx['labels'], ai['infer_patch_nums'], cfg=ai['cfg'], top_k=ai['top_k'],
                     top_p=ai['top_p'], cfg_form=form)
    torch.testing.assert_close(img, ref['image'], atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# invariants of the model and of SSR
# ---------------------------------------------------------------------------------------------------------

def small_model(V=64, depth=2, classes=10, seed=0):
    torch.manual_seed(seed)
    model = sar.FlexVAR(depth, V, classes, 32, drop_path_rate=0.0).init_weights(init_adaln_gamma=0.5)
    with torch.no_grad():  # random, non-degenerate weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def small_vae(V=64, seed=0):
    torch.manual_seed(seed)
    return tokenizer.VQVAE(codebook_size=V, codebook_dim=32, z_channels=16, ch=8, ch_mult=(1, 2, 2),
                           num_res_blocks=1).eval().requires_grad_(False)


def test_block_causal_mask_written_out():
    """The mask for two tiny scale lists, written out by hand (1 = may attend): a token sees its own scale and
    every coarser one, never a finer one. The official mask for 1,2,3,5,8 is test_fixture_tf_logits_and_mask."""
    assert sar.block_causal_mask([1, 2]).int().tolist() == [[1, 0, 0, 0, 0],
                                                            [1, 1, 1, 1, 1],
                                                            [1, 1, 1, 1, 1],
                                                            [1, 1, 1, 1, 1],
                                                            [1, 1, 1, 1, 1]]
    # a first scale above 1 (FlexVAR's lists may start anywhere): the 4 tokens of 2x2 see each other only
    assert sar.block_causal_mask([2, 3]).int().tolist() == [[1] * 4 + [0] * 9] * 4 + [[1] * 13] * 9


def test_causality_changing_a_scale_input_only_affects_it_and_finer():
    model, scales = small_model(), [1, 2, 3, 5]
    be = sar.begin_ends(scales)
    x = torch.randn(2, sum(p * p for p in scales) - 1, 32)
    lab = torch.tensor([1, 3])
    with torch.no_grad():
        base = model(lab, x, scales)
        for i in range(1, len(scales)):
            x2 = x.clone()
            x2[:, be[i][0] - 1:be[i][1] - 1] += torch.randn(2, scales[i] ** 2, 32)    # input of scale i
            out = model(lab, x2, scales)
            assert torch.equal(out[:, :be[i][0]], base[:, :be[i][0]])               # coarser scales untouched
            assert (out[:, be[i][0]:be[i][1]] - base[:, be[i][0]:be[i][1]]).abs().max() > 1e-4  # its own changes


def test_ssr_all_equals_student_pass_scale_by_scale():
    """Eq. 6 in one pass over the shifted sequence == running each scale's student prediction separately,
    with only its own prefix of self-generated inputs."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 5]
    K, be = len(scales), sar.begin_ends(scales)
    drawn = {i: torch.randint(0, 64, (2, pn * pn)) for i, pn in enumerate(scales)}
    lab = torch.tensor([0, 7])
    with torch.no_grad():
        all_logits, which = sar.student_pass(model, vae, lab, drawn, scales, 'all')
        assert which == list(range(1, K))
        for i in range(1, K):
            prefix = scales[:i + 1]
            x = sar.tf_input(vae, [drawn[j] for j in range(i + 1)], prefix)
            one = model(lab, x, prefix)[:, be[i][0]:be[i][1]]
            torch.testing.assert_close(all_logits[:, be[i][0] - 1:be[i][1] - 1], one, atol=1e-5, rtol=0)


def test_teacher_targets_carry_no_gradient():
    """L_SAR's gradient = grad L_TF + gamma * grad CE(student logits, fixed tokens): the teacher-forced
    prediction used as the CSF target is a constant (drawn without grad)."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    images, labels = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([2, 5])
    gt, x = sar.gt_tokens_and_inputs(vae, images, scales)
    o = opts('--mode', 'sar', '--cond-drop', '0', '--sf-input', 'argmax', '--sf-transitions', 'all', '--gamma', '0.5')
    loss, info = loss_of(model, vae, gt, x, labels, scales, o)
    g_total = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    with torch.no_grad():
        tf_logits = model(labels, x, scales)
        drawn = {i: tf_logits[:, a:b].argmax(-1) for i, (a, b) in enumerate(sar.begin_ends(scales))}
    assert not any(t.requires_grad for t in drawn.values())
    l_tf = sar.token_ce(model(labels, x, scales), torch.cat(gt, 1))
    sf_logits, which = sar.student_pass(model, vae, labels, drawn, scales, 'all')
    l_csf = sar.token_ce(sf_logits, torch.cat([drawn[i] for i in which], 1))
    g_ref = torch.autograd.grad(l_tf + 0.5 * l_csf, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_total, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('sf_cfg,passes', [('1.2', [True, False, True]), ('1.0', [True, True])])
def test_cfg_sf_uncond_pass_is_outside_autograd(sf_cfg, passes):
    """The unconditional logits only serve to draw SF inputs: their pass runs without autograd (the official
    code backpropagates through them for nothing). At --sf-cfg <= 1 the official code samples unguided: no
    unconditional pass at all."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    images, labels = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([2, 5])
    gt, x = sar.gt_tokens_and_inputs(vae, images, scales)
    o = opts('--mode', 'sar', '--cond-drop', '0', '--sf-input', 'cfg', '--sf-top-k', '20', '--sf-cfg', sf_cfg)
    calls = []
    hook = model.head.register_forward_hook(lambda m, i, out: calls.append(torch.is_grad_enabled()))
    loss_of(model, vae, gt, x, labels, scales, o, torch.Generator().manual_seed(0))
    hook.remove()
    assert calls == passes   # TF pass with grad, [uncond pass without,] student pass with grad


def test_top_k_top_p_sampler_matches_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = logits.softmax(-1)[0]
    # top-k 4 then top-p 0.8: keep the 4 largest; drop the ascending tail whose cumulative mass <= 0.2
    keep = torch.zeros(6, dtype=torch.bool)
    keep[:4] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    order = torch.argsort(q)
    cum = torch.cumsum(q[order], 0)
    drop = order[cum <= 0.2]
    q[drop] = 0
    q = q / q.sum()
    g = torch.Generator().manual_seed(0)
    draws = sar.sample_top_k_top_p(logits.expand(40000, 6), 4, 0.8, g)
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    torch.testing.assert_close(freq, q, atol=0.01, rtol=0)
    assert torch.equal(sar.sample_top_k_top_p(logits, 1, 0.0), torch.tensor([0]))


def test_kv_cached_sampling_equals_teacher_forcing_forward():
    """The logits of every KV-cached AR step == a teacher-forcing forward on the sequence it sampled."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    labels = torch.tensor([1, 4, 9])
    idx, logits = sar.generate_tokens(model, vae, labels, scales, cfg=0.0, top_k=10, top_p=0.9,
                                      generator=torch.Generator().manual_seed(3), cfg_form='llamagen')  # uncond only
    idx_c, logits_c = sar.generate_tokens(model, vae, labels, scales, cfg=None, top_k=10, top_p=0.9,
                                          generator=torch.Generator().manual_seed(3))                   # cond only
    with torch.no_grad():
        tf = model(labels, sar.tf_input(vae, idx_c, scales), scales)
        tf_unc = model(torch.full_like(labels, 10), sar.tf_input(vae, idx, scales), scales)
    torch.testing.assert_close(torch.cat(logits_c, 1), tf, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(logits, 1), tf_unc, atol=1e-4, rtol=0)


def test_sampling_same_seed_same_images():
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    labels = torch.tensor([0, 1, 2, 3])
    run = lambda s: sar.sample(model, vae, labels, scales, 2.0, 20, 0.95, torch.Generator().manual_seed(s))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bf16_autocast_training_step_and_sampling():
    """The CUDA default (bf16 autocast) on CPU: the losses stay close to fp32, the embeddings stay fp32,
    sampling runs and gives finite images."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    images, labels = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([2, 5])
    gt, x = sar.gt_tokens_and_inputs(vae, images, scales)
    o = opts('--mode', 'sar', '--cond-drop', '0', '--sf-input', 'argmax')
    ref, _ = loss_of(model, vae, gt, x, labels, scales, o)
    with sar.autocast_ctx(torch.device('cpu'), 'bf16'):
        loss, info = loss_of(model, vae, gt, x, labels, scales, o)
        img = sar.sample(model, vae, labels, scales, 1.5, 10, 0.9, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(img).all() and img.shape == (2, 3, 16, 16)


@pytest.mark.parametrize('case', ['3d', '2d', 'strided', 'x_frozen'])
@pytest.mark.parametrize('bias', [True, False])
def test_onednn_linear_matches_float64_reference(case, bias):
    """cpu_speed.linear (oneDNN for fp32 on x86 CPUs): output and the gradients of input, weight and bias
    equal F.linear computed in float64, to fp32 rounding, also for a transposed (strided) input and an input
    without gradient (as word_embed's); the output takes in-place ops like nn.Linear's; under bf16 autocast
    and for an empty input it is F.linear itself."""
    g = torch.Generator().manual_seed(0)
    shape = {'3d': (2, 5, 24), '2d': (7, 24)}.get(case, (24, 7))
    x = torch.randn(*shape, generator=g)
    x = x.t() if shape == (24, 7) else x                     # 'strided', 'x_frozen': a transposed (7, 24) view
    w, b = torch.randn(9, 24, generator=g), torch.randn(9, generator=g) if bias else None

    def leaves(dtype):       # fresh leaves (x keeps its strides); x has no gradient in 'x_frozen'
        return [t.detach().to(dtype).requires_grad_(t is not x or case != 'x_frozen') if t is not None else None
                for t in (x, w, b)]
    ours, ref = leaves(torch.float32), leaves(torch.float64)
    if not cpu_speed.ONEDNN_LINEAR:
        pytest.skip("oneDNN linear is off on this machine (not x86, or SAR_ONEDNN=0)")
    y, y_ref = cpu_speed.linear(*ours), torch.nn.functional.linear(*ref)
    assert '_OneDNNLinear' in repr(y.grad_fn.next_functions)
    up = torch.randn(y.shape, generator=g)
    wrt = [i for i, t in enumerate(ours) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [ours[i] for i in wrt], up)
    ref_grads = torch.autograd.grad(y_ref, [ref[i] for i in wrt], up.double())
    for got, want in zip((y, *grads), (y_ref, *ref_grads)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    cpu_speed.linear(*ours).add_(1.0).sum().backward()       # in place on the output, then backward
    assert cpu_speed.linear(torch.zeros(0, 24), w, b).shape == (0, 9)
    with sar.autocast_ctx(torch.device('cpu'), 'bf16'):
        assert cpu_speed.linear(x, w, b).dtype == torch.bfloat16


def test_cpu_speed_apply_swaps_linears_and_falls_back_without_the_op(monkeypatch, capsys):
    """apply() turns exactly the nn.Linear layers of a CPU model into FastLinear (state_dict and outputs
    unchanged to fp32 rounding); when the private oneDNN op is missing (a future torch), one warning line and
    the layers stay nn.Linear, so the model computes F.linear exactly."""
    torch.manual_seed(0)
    ref = sar.FlexVAR(depth=1, vocab_size=16, num_classes=3, codebook_dim=4).init_weights()
    labels, x, scales = torch.tensor([0, 2]), torch.randn(2, 4 + 9, 4), [1, 2, 3]   # x: inputs of scales 2, 3
    want = ref(labels, x, scales)
    linears = [n for n, m in ref.named_modules() if type(m) is torch.nn.Linear]
    monkeypatch.setattr(cpu_speed, '_ONEDNN_OK', None)
    monkeypatch.setattr(cpu_speed, 'ONEDNN_LINEAR', True)
    fast = cpu_speed.apply(copy.deepcopy(ref))
    assert [n for n, m in fast.named_modules() if type(m) is cpu_speed.FastLinear] == linears
    assert fast.state_dict().keys() == ref.state_dict().keys()
    assert torch.allclose(fast(labels, x, scales), want, atol=1e-5)

    def gone(*a):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")
    monkeypatch.setattr(cpu_speed, '_onednn_mm', gone)
    monkeypatch.setattr(cpu_speed, '_ONEDNN_OK', None)
    kept = cpu_speed.apply(copy.deepcopy(ref))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'oneDNN linear kernel is not usable' in err[0] and 'F.linear' in err[0], err
    assert not any(type(m) is cpu_speed.FastLinear for m in kept.modules())
    assert torch.equal(kept(labels, x, scales), want)


# ---------------------------------------------------------------------------------------------------------
# training schedules and the official recipe
# ---------------------------------------------------------------------------------------------------------

def test_random_scale_schedule_matches_official_statistics():
    """The official function, simulated with 2e5 draws: last scale 16: 66.6%, 15: 13.7%, 14: 10.2%,
    13: 6.4%, 12: 2.8%; length 8: 39%, 9: 48%; mean L 591, min 311, max 680."""
    rng = random.Random(0)
    lists = [sar.random_scales(sar.OFFICIAL_SCALES, rng) for _ in range(20000)]
    n = len(lists)
    last = {f: sum(s[-1] == f for s in lists) / n for f in (16, 15, 14, 13, 12)}
    for f, ref in zip((16, 15, 14, 13, 12), (0.666, 0.137, 0.102, 0.064, 0.028)):
        assert abs(last[f] - ref) < 0.015, (f, last[f])
    lengths = [len(s) for s in lists]
    assert abs(lengths.count(8) / n - 0.39) < 0.02 and abs(lengths.count(9) / n - 0.48) < 0.02
    Ls = [sum(p * p for p in s) for s in lists]
    assert abs(np.mean(Ls) - 591) < 4 and max(Ls) == 680 and min(Ls) >= 311
    assert all(s[0] == 1 and all(b > a for a, b in zip(s, s[1:])) for s in lists)
    small = [sar.random_scales(sar.LAPTOP_SCALES, rng) for _ in range(2000)]
    assert all(sum(p * p for p in s) <= 155 and s[0] == 1 and all(b > a for a, b in zip(s, s[1:])) for s in small)


def test_the_full_scale_list_also_goes_through_the_random_drop():
    """Official: the 5% fixed list is not returned early, it passes the drop step too (u > 0.9: 10% of it)."""
    class Fixed(random.Random):      # first draw < 0.05 (the fixed list), then the drop draw u
        def __init__(self, u):
            super().__init__(0)
            self.draws = [0.01, u]

        def random(self):
            return self.draws.pop(0) if self.draws else super().random()
    assert sar.random_scales(sar.OFFICIAL_SCALES, Fixed(0.5)) == list(sar.OFFICIAL_SCALES)
    dropped = sar.random_scales(sar.OFFICIAL_SCALES, Fixed(0.93))
    assert len(dropped) == 9 and dropped[:2] == [1, 2] and dropped[-1] == 16


def test_random_scales_invariants_on_any_scale_list():
    """10,000 random (--scales, step) pairs, the step seeded as the training loop seeds it. The schedule's
    first draw picks the branch: below 0.05 the given list itself, else a list that always starts [1, 2]
    ([1] when the finest side is 2). The drops after it never remove the first element, so the result starts
    with the smallest side of the drawn list: default[0] in the full-list branch, 1 in the random one. It
    keeps at least two scales, stays strictly increasing, never goes finer than the given list, and never
    holds more tokens than the given list (the budget)."""
    gen = random.Random(1234)
    branches = set()
    for _ in range(10_000):
        n = gen.randint(2, 12)
        first = 1 if gen.random() < 0.5 else gen.randint(1, 20)
        default = [first] + sorted(gen.sample(range(first + 1, 33), n - 1))      # finest up to 32
        seed, step = gen.randrange(1000), gen.randrange(10_001)
        got = sar.random_scales(default, random.Random(common.step_seed(seed, step)))
        full = random.Random(common.step_seed(seed, step)).random() < 0.05     # the branch, from the same seed
        branches.add(full)
        ctx = (default, seed, step, got)
        assert got[0] == (default[0] if full else 1), ctx
        assert len(got) >= 2 and all(b > a for a, b in zip(got, got[1:])), ctx
        assert got[-1] <= default[-1], ctx
        assert sum(p * p for p in got) <= sum(p * p for p in default), ctx
        assert not full or set(got) <= set(default), ctx                     # the full branch only drops
    assert branches == {True, False}


def old_random_scales(default, rng):
    """The schedule before it kept the first scale: built [1, 2] + ... + [final] whatever the finest side, and
    popped at randint(len - 4, len - 1) until the list fit the budget, with no guard (index -1 pops the last
    scale, 0 the first; nothing stops at one scale)."""
    final, budget = default[-1], sum(p * p for p in default)
    if rng.random() < 0.05:
        scales = list(default)
    else:
        split = round(final * 10 / 16)
        lo, hi = list(range(3, split + 1)), list(range(split + 1, final))
        scales = [1, 2] + sorted(rng.sample(lo, min(5, len(lo))) + rng.sample(hi, min(2, len(hi)))) + [final]
    u = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if u > threshold and len(scales) > 4:
            scales.pop(rng.randint(2, len(scales) - 2))
    while sum(p * p for p in scales) > budget:
        scales.pop(rng.randint(len(scales) - 4, len(scales) - 1))
    return scales


def test_short_scale_list_trains_with_the_random_schedule(tiny_vae_path, tmp_path):
    """--scales 1,2,4: the random list [1, 2, 3, 4] holds 30 tokens, over the budget of 21, so the schedule
    drops scales. The old drop rule gave a one-scale list at some step of this run (shown here by running it
    with the same seeds), which crashed training; now every step trains on a valid list, the one the schedule
    gives for that step."""
    steps = 8
    seeds = [common.step_seed(0, s) for s in range(steps)]
    crash = [s for s in range(steps) if len(old_random_scales([1, 2, 4], random.Random(seeds[s]))) < 2]
    assert crash, "no step of this run would have had a one-scale list under the old rule"
    out = tmp_path / 'short'
    sar.main(train_args(tiny_vae_path, str(out), '--scales', '1,2,4', '--mode', 'sar', '--sf-input', 'argmax',
                        '--steps', str(steps), '--batch-size', '2'))
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in recs] == list(range(1, steps + 1))
    assert [r['scales'] for r in recs] == [sar.random_scales([1, 2, 4], random.Random(s)) for s in seeds]
    assert all(len(r['scales']) >= 2 and r['scales'][0] == 1 and np.isfinite(r['loss']) for r in recs)
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == steps


def test_lr_schedule_closed_form():
    f = lambda s: common.lr_at(s, 1000, 1.0, 100, 0.1, 0.05)
    assert f(0) == pytest.approx(0.005) and f(50) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(100) == 1.0 and f(145) == 1.0                      # hold 5% of the 900 post-warm-up steps
    assert f(1000) == pytest.approx(0.1)
    assert f(145 + 855 // 2) == pytest.approx(1 - 0.9 * (855 // 2) / 855, abs=2e-3)


@pytest.mark.parametrize('depth,first,last', [(16, 4.68e-5, 3.0e-5), (20, 4.23e-5, 3.0e-5), (24, 1.02e-5, 2.4e-6)])
def test_official_sar_lr_per_depth(depth, first, last):
    """The LR of the first and last SAR step of the official runs (batch 768), computed with the official
    lin0 function at epoch 179/249/349 of 190/260/360 (values of the official code's effective schedule)."""
    o = opts('--mode', 'sar', '--depth', str(depth), '--batch-size', '768', '--steps', '100')
    lrs = [common.lr_at(s, o.steps, o.lr, o.warmup_steps, o.lr_end, o.lr_hold) for s in (0, o.steps)]
    assert lrs[0] == pytest.approx(first, rel=0.02) and lrs[1] == pytest.approx(last, rel=0.02)
    tf = opts('--mode', 'tf', '--depth', str(depth), '--batch-size', '768')
    assert tf.lr == pytest.approx((8e-5 if depth == 24 else 1e-4) * 3) and tf.lr_end == (0.01 if depth == 24 else 0.1)


def test_official_sizes_default_to_the_official_data_pipeline():
    o = opts('--depth', '16')
    assert (o.image_size, o.crop, o.scales) == (512, 'random', list(sar.OFFICIAL_SCALES))
    o = opts('--depth', '16', '--image-size', '256', '--crop', 'center')     # the paper's 256 px, an option
    assert (o.image_size, o.crop) == (256, 'center')
    assert (opts().image_size, opts().crop) == (32, 'center')


def test_weight_decay_groups():
    m = small_model()
    groups = sar.make_optimizer(m, 1e-3, 0.05).param_groups
    decay = {n for n, p in m.named_parameters() if any(p is q for q in groups[0]['params'])}
    assert groups[0]['weight_decay'] == 0.05 and groups[1]['weight_decay'] == 0.0
    assert 'pos_1LC' not in decay and 'pos_start' not in decay and 'blocks.0.attn.scale_mul_1H11' not in decay
    assert {'class_emb.weight', 'head.weight', 'word_embed.weight', 'blocks.0.ada_lin.1.weight'} <= decay
    assert not any(n.endswith('bias') for n in decay) and set(dict(m.named_parameters())) - decay


def test_fp16_overflow_step_is_skipped_and_the_scale_capped():
    """Official AMP: sar.py's GradScaler (init scale 2^11) with growth every step instead of every 1000: good
    steps double the scale 2^12, 2^13, 2^14, 2^15 and then it stays at exactly 32768 (the cap); an inf
    gradient halves it and skips the step (weights and Adam state unchanged); the next good step grows it
    again."""
    model = small_model()
    opt = sar.make_optimizer(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 11, growth_interval=1)
    x, lab = torch.randn(2, 13, 32), torch.tensor([1, 2])

    def step(poison=False):
        with torch.autocast('cpu', dtype=torch.float16):
            loss = model(lab, x, [1, 2, 3]).float().logsumexp(-1).mean()
        scaler.scale(loss).backward()
        if poison:
            model.head.weight.grad[0, 0] = float('inf')
        return sar.optimizer_step(model, opt, scaler, 2.0)
    scales = []
    for _ in range(7):
        assert torch.isfinite(step())
        scales.append(scaler.get_scale())
    assert scales == [2. ** 12, 2. ** 13, 2. ** 14, 32768., 32768., 32768., 32768.]
    before = [p.detach().clone() for p in model.parameters()]
    adam = copy.deepcopy(opt.state_dict()['state'])
    assert not torch.isfinite(step(poison=True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))       # skipped
    after = opt.state_dict()['state']
    assert all(torch.equal(adam[i][k], after[i][k]) for i in adam for k in adam[i])
    assert scaler.get_scale() == 16384.0
    assert torch.isfinite(step()) and scaler.get_scale() == 32768.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------------------
# the training loop: resume, DDP, errors
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_vae_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('vae') / 'vae.pt')
    v = small_vae(V=64)
    common.save_atomic({'config': v.config, 'model': v.state_dict(), 'image_size': 16, 'scales': [1, 2, 3, 4]}, path)
    return path


def train_args(vae, out, *extra):
    return ['--vae', vae, '--depth', '1', '--image-size', '16', '--scales', '1,2,3,4', '--batch-size', '4',
            '--out-dir', out, '--quiet', '--workers', '0', '--log-every', '1', '--sf-top-k', '16', '--dtype', 'fp32',
            *extra]


def weights(path):
    return sar.extract_state_dict(torch.load(path, weights_only=True))


def scale_lists(scales, steps, seed=0):
    """The random schedule's list at each step of a run, drawn as the training loop draws it."""
    return [sar.random_scales(scales, random.Random(common.step_seed(seed, s))) for s in range(steps)]


def test_resume_continues_exactly(tiny_vae_path, tmp_path):
    """SAR's default LR is constant below depth 12, so 3 steps, then 3 more with --resume, must give exactly
    the weights of 6 uninterrupted steps (data order, flips, scale lists and SF draws come from the step).
    --scales 1,2,4 is over the token budget in the random branch, so the list changes from step to step, also
    across the resume point."""
    lists = scale_lists([1, 2, 4], 6)
    assert lists[2] != lists[3] and len({tuple(s) for s in lists[3:]}) > 1, lists
    common = ('--mode', 'sar', '--ckpt-every', '100', '--sf-input', 'sample', '--flip', '--scales', '1,2,4')
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'a'), *common, '--steps', '6'))
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'b'), *common, '--steps', '3'))
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 3
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'b'), *common, '--steps', '6', '--resume'))
    wa, wb = weights(tmp_path / 'a' / 'ckpt.pt'), weights(tmp_path / 'b' / 'ckpt.pt')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 6
    assert [json.loads(line)['scales'] for line in open(tmp_path / 'b' / 'log.jsonl')] == lists


def test_resumed_log_holds_every_step_once(tiny_vae_path, tmp_path):
    """A run killed after its checkpoint of step 2 had logged steps 3 and 4 and half a line of step 5 (made up
    here, with a loss no step gives). --resume runs steps 3 and 4 again: log.jsonl then holds steps 1..4 once
    each, in order; the records up to the checkpoint are kept byte for byte, those after it are the new ones,
    equal to an uninterrupted run's (SAR: a constant LR, so the runs of 2 and 4 steps share their first 2).
    A new run (no --resume) in the same folder starts the log afresh."""
    out, full, sar_ = tmp_path / 'k', tmp_path / 'full', ('--mode', 'sar', '--sf-input', 'argmax')
    sar.main(train_args(tiny_vae_path, str(out), *sar_, '--steps', '2', '--ckpt-every', '2'))
    kept = open(out / 'log.jsonl').read()
    assert [json.loads(line)['step'] for line in kept.splitlines()] == [1, 2]
    with open(out / 'log.jsonl', 'a') as f:
        for step in (3, 4):
            f.write(json.dumps(dict(step=step, loss=999.0, grad_norm=999.0)) + '\n')
        f.write('{"step": 5, "loss": 9')                                     # cut short by the kill
    sar.main(train_args(tiny_vae_path, str(out), *sar_, '--steps', '4', '--ckpt-every', '2', '--resume'))
    text = open(out / 'log.jsonl').read()
    assert text.startswith(kept)
    recs = [json.loads(line) for line in text.splitlines()]
    assert [r['step'] for r in recs] == [1, 2, 3, 4] and 999.0 not in [r['loss'] for r in recs]
    sar.main(train_args(tiny_vae_path, str(full), *sar_, '--steps', '4', '--ckpt-every', '2'))
    ref = log_records(full)
    for k in ('loss', 'grad_norm', 'lr', 'scales'):
        assert [r[k] for r in recs] == [r[k] for r in ref], k
    sar.main(train_args(tiny_vae_path, str(out), *sar_, '--steps', '1'))
    assert [r['step'] for r in log_records(out)] == [1]


def test_images_per_second_counts_the_steps_since_the_last_log(tiny_vae_path, tmp_path, monkeypatch):
    """A log at the last step (not a multiple of --log-every) divides by the steps run since the last log, not
    by --log-every. A fake clock advances 10 s per reading: 2 steps of 4 images, then 1 step."""
    clock = iter(range(0, 10000, 10))
    monkeypatch.setattr(sar, 'time', type('Clock', (), {'time': staticmethod(lambda: float(next(clock)))}))
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'r'), '--steps', '3', '--log-every', '2'))
    recs = [json.loads(line) for line in open(tmp_path / 'r' / 'log.jsonl')]
    assert [r['step'] for r in recs] == [2, 3]
    assert [r['imgs_per_s'] for r in recs] == [pytest.approx(2 * 4 / 10), pytest.approx(1 * 4 / 10)]


def test_fp16_training_runs_with_the_official_scaler(tiny_vae_path, tmp_path):
    """The official scaler in the loop: it starts at 2^11 and grows only after 1000 good steps, so in 3 steps
    the logged scale is 2048 halved once for every step whose gradients overflowed (inf grad norm), and the
    checkpoint keeps the last one."""
    out = tmp_path / 'fp16'
    sar.main(train_args(tiny_vae_path, str(out), '--mode', 'sar', '--steps', '3', '--dtype', 'fp16'))
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert ck['step'] == 3 and [r['step'] for r in recs] == [1, 2, 3]
    expect, overflowed, good_run = [], 0, 0
    for r in recs:
        bad = not np.isfinite(r['grad_norm'])
        overflowed, good_run = overflowed + bad, 0 if bad else good_run + 1
        expect.append(2048.0 / 2 ** overflowed)
    assert [r['fp16_scale'] for r in recs] == expect and ck['scaler']['scale'] == expect[-1]
    # the good steps since the last overflow, counted towards the next growth
    assert ck['scaler']['growth_interval'] == 1000 and ck['scaler']['_growth_tracker'] == good_run


def test_compile_runs_a_few_steps(tiny_vae_path, tmp_path):
    """--compile (inductor; on CPU it needs a C++ compiler) trains like the eager model: a SAR run whose random
    scale list differs at every step (--scales 1,2,4, --seed 1: three lists of 21, 10 and 14 tokens, checked
    below), and whose student pass has its own length, so the compiled blocks see a new shape at each call."""
    lists = scale_lists([1, 2, 4], 3, seed=1)
    assert len({sum(p * p for p in s) for s in lists}) == 3, lists
    common = ('--steps', '3', '--mode', 'sar', '--sf-input', 'argmax', '--cond-drop', '0', '--drop-path', '0',
              '--no-flip', '--dtype', 'fp32', '--scales', '1,2,4', '--seed', '1')
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'eager'), *common))
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'compiled'), *common, '--compile'))
    wa, wb = weights(tmp_path / 'eager' / 'ckpt.pt'), weights(tmp_path / 'compiled' / 'ckpt.pt')
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
    assert [json.loads(line)['scales'] for line in open(tmp_path / 'compiled' / 'log.jsonl')] == lists


def log_records(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def assert_same_steps(ref, got, rel=1e-5):
    """Two runs of the same global batch log the same numbers at every step: the loss, its parts, and the
    gradient norm before clipping (a gradient summed instead of averaged over processes or micro-batches
    would log twice the norm)."""
    assert [r['step'] for r in got] == [r['step'] for r in ref] and [r['scales'] for r in got] == \
        [r['scales'] for r in ref]
    for a, b in zip(ref, got):
        for k in ('loss', 'loss_tf', 'loss_csf', 'grad_norm'):
            assert b[k] == pytest.approx(a[k], rel=rel), (a['step'], k, a[k], b[k])


def test_ddp_two_processes_equal_one_process(tiny_vae_path, tmp_path):
    """2 processes (torchrun, gloo) of 2 images each vs 1 process of 4: the same weights, and per step the same
    logged loss, loss_tf, loss_csf and gradient norm (every logged number is the mean over the processes, as
    the gradients are). Flips are drawn per image from its place in the global batch and the scale list per
    step, so they agree across world sizes; class dropout, drop-path and SF sampling draw from per-rank
    generators, so they are turned off here (--cond-drop 0, --drop-path 0, --sf-input argmax), and the
    fixed schedule keeps the list the same for both (the random one would too: it is seeded by the step)."""
    common = ('--steps', '3', '--scale-schedule', 'fixed', '--cond-drop', '0', '--drop-path', '0',
              '--mode', 'sar', '--sf-input', 'argmax', '--flip', '--log-every', '1')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = [sys.executable, 'sar.py', *train_args(tiny_vae_path, str(tmp_path / 'one'), *common)]
    two = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'sar.py',
           *train_args(tiny_vae_path, str(tmp_path / 'two'), *common)]
    for cmd in (one, two):
        r = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = weights(tmp_path / 'one' / 'ckpt.pt'), weights(tmp_path / 'two' / 'ckpt.pt')
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)
    ck = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)
    assert ck['step'] == 3 and any(s['exp_avg'].abs().sum() > 0 for s in ck['optimizer']['state'].values())
    ref = log_records(tmp_path / 'one')
    assert [r['step'] for r in ref] == [1, 2, 3] and all(r['grad_norm'] > 0 for r in ref)
    assert_same_steps(ref, log_records(tmp_path / 'two'))
    # the official recipe under DDP (CFG-sampled SF inputs: the unconditional pass runs through the DDP
    # wrapper, which has none of the model's attributes), the random schedule and class dropout
    cfg = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'sar.py',
           *train_args(tiny_vae_path, str(tmp_path / 'cfg'), '--steps', '2', '--mode', 'sar')]
    r = subprocess.run(cfg, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(r['step'], r['loss_csf'] > 0) for r in log_records(tmp_path / 'cfg')] == [(1, True), (2, True)]


def test_torchrun_of_one_process_takes_the_ddp_path_and_equals_plain_python(tiny_vae_path, tmp_path):
    """`torchrun --nproc_per_node 1 sar.py` runs the DDP code path (so one GPU checks the nccl backend): the
    start line says so, and the run equals plain `python sar.py` exactly (an all-reduce over 1 process, / 1)."""
    common = ('--steps', '2', '--mode', 'sar', '--log-every', '1')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    runs = {'plain': [sys.executable, 'sar.py'],
            'torchrun': [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
                         'sar.py']}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + train_args(tiny_vae_path, str(tmp_path / name), *common), cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ('cpu DDP gloo' in r.stdout + r.stderr) == (name == 'torchrun'), r.stdout + r.stderr
    ref, got = log_records(tmp_path / 'plain'), log_records(tmp_path / 'torchrun')
    drop = lambda recs: [{k: v for k, v in r.items() if k != 'imgs_per_s'} for r in recs]  # noqa
    assert len(ref) == 2 and drop(ref) == drop(got)
    wa, wb = weights(tmp_path / 'plain' / 'ckpt.pt'), weights(tmp_path / 'torchrun' / 'ckpt.pt')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accum_equals_one_big_batch_per_step(tiny_vae_path, tmp_path):
    """--grad-accum 2 (two micro-batches of 2) vs --grad-accum 1 (one batch of 4), 1 process: the same images
    per step (their place in the global batch decides them), so the same logged loss, loss parts and gradient
    norm at every step (the loss is divided by --grad-accum before backward; without it the norm would
    double). Drop-path and class dropout draw per micro-batch from one step generator, and SF sampling
    consumes it in another order, so all three are off (--drop-path 0, --cond-drop 0, --sf-input argmax)."""
    common = ('--steps', '3', '--cond-drop', '0', '--drop-path', '0', '--mode', 'sar', '--sf-input', 'argmax',
              '--flip', '--scales', '1,2,4')
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'a1'), *common, '--grad-accum', '1'))
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'a2'), *common, '--grad-accum', '2'))
    ref = log_records(tmp_path / 'a1')
    assert [r['step'] for r in ref] == [1, 2, 3] and all(r['grad_norm'] > 0 for r in ref)
    assert_same_steps(ref, log_records(tmp_path / 'a2'))
    wa, wb = weights(tmp_path / 'a1' / 'ckpt.pt'), weights(tmp_path / 'a2' / 'ckpt.pt')
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)


def error_of(capsys, argv, main=sar.main):
    t = time.time()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and time.time() - t < 20
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err
    return err


def test_errors_bad_scales(capsys, tiny_vae_path, tmp_path):
    assert 'strictly increasing' in error_of(capsys, ['--scales', '1,3,2'])
    assert 'latent' in error_of(capsys, train_args(tiny_vae_path, str(tmp_path), '--scales', '1,2,3,4,8'))


@pytest.mark.parametrize('flags,what', [(['--steps', '0'], '--steps 0'), (['--steps', '-3'], '--steps -3'),
                                        (['--batch-size', '0'], '--batch-size 0'), (['--lr', '-1'], '--lr -1.0'),
                                        (['--num-samples', '0'], '--num-samples 0'), (['--cfg', '-3'], '--cfg -3.0'),
                                        (['--top-p', '2'], '--top-p 2.0'), (['--classes', 'a,b'], '--classes'),
                                        (['--mode', 'x'], 'invalid choice'), (['--bogus'], 'unrecognized'),
                                        (['--device', 'nonsense'], "--device 'nonsense' is not a torch device"),
                                        (['--device', 'cuda:99'], '--device cuda:99: not available')])
def test_bad_values_are_refused_before_any_work(capsys, tmp_path, flags, what):
    out = tmp_path / 'never'
    assert what in error_of(capsys, ['--out-dir', str(out), *flags])
    assert not out.exists()                       # nothing written, no checkpoint path printed


def test_errors_missing_vae_and_bad_checkpoint(capsys, tiny_vae_path, tmp_path):
    err = error_of(capsys, train_args(str(tmp_path / 'nope.pt'), str(tmp_path)))
    assert 'nope.pt' in err
    # a checkpoint of another depth
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'd1'), '--steps', '1'))
    err = error_of(capsys, train_args(tiny_vae_path, str(tmp_path / 'd2'), '--depth', '2', '--init',
                                      str(tmp_path / 'd1' / 'ckpt.pt')))
    assert 'depth-1' in err
    # mismatched keys are listed
    model = sar.FlexVAR(1, 64, 10, 32)
    sd = model.state_dict()
    sd.pop('head.bias')
    sd['extra.weight'] = torch.zeros(1)
    with pytest.raises(common.UserError, match='head.bias.*extra.weight'):
        common.load_state_dict_strict(model, sd, 'this file')


def test_error_batch_not_divisible_by_processes(capsys, tiny_vae_path, tmp_path):
    err = error_of(capsys, train_args(tiny_vae_path, str(tmp_path), '--batch-size', '4', '--grad-accum', '3'))
    assert 'divisible' in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(capsys, tiny_vae_path, tmp_path):
    out = str(tmp_path / 'nan')
    err = error_of(capsys, train_args(tiny_vae_path, out, '--steps', '20', '--ckpt-every', '1', '--lr', '1e35',
                                      '--warmup-steps', '0', '--log-every', '100'))
    assert 'stopped' in err
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck['model'].values())
    assert not any(f.endswith('.tmp') for f in os.listdir(out))


def test_checkpoint_needing_unpickling_is_refused_without_trust(capsys, tiny_vae_path, tmp_path):
    """Official training outputs pickle an args object: weights_only loading refuses it unless trusted."""
    import argparse
    path = str(tmp_path / 'wrapped.pt')
    sd = sar.FlexVAR(1, 64, 10, 32).init_weights().state_dict()
    torch.save({'trainer': {'var_wo_ddp': sd}, 'args': argparse.Namespace(a=1)}, path)
    err = error_of(capsys, train_args(tiny_vae_path, str(tmp_path / 'o'), '--init', path, '--steps', '1'))
    assert '--trust-checkpoint' in err
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'o'), '--init', path, '--steps', '1', '--trust-checkpoint'))
    assert torch.load(tmp_path / 'o' / 'ckpt.pt', weights_only=True)['step'] == 1


@pytest.fixture(scope='module')
def depth1_ckpt(tiny_vae_path, tmp_path_factory):
    """A checkpoint of ours: one step of the depth-1 model of train_args."""
    out = tmp_path_factory.mktemp('depth1')
    sar.main(train_args(tiny_vae_path, str(out), '--steps', '1'))
    return str(out / 'ckpt.pt')


@pytest.mark.parametrize('flags,needles', [
    (['--drop-path', '2'], ['--drop-path 2.0 is out of range', 'in [0, 1)']),
    (['--weight-decay', '-1'], ['--weight-decay -1.0 is out of range', '>= 0']),
    (['--lr', 'nan'], ['--lr nan is out of range', '> 0']),
    (['--lr', 'inf'], ['--lr inf is out of range', '> 0']),
    (['--steps', '-5'], ['--steps -5 is out of range', '>= 1'])])
def test_out_of_range_flag_is_named_alone(capsys, tmp_path, flags, needles):
    """The flag as typed, and only it: --steps -5 is not reported as the --warmup-steps it would imply."""
    out = tmp_path / 'never'
    err = error_of(capsys, ['--out-dir', str(out), *flags])
    assert all(n in err for n in needles) and '--warmup-steps' not in err, err
    assert not out.exists()


def test_image_size_must_be_a_multiple_of_the_tokenizer_downsample(capsys, tiny_vae_path, tmp_path):
    ds = tokenizer.load_tokenizer(tiny_vae_path).downsample
    assert ds > 1
    size = 8 * ds - ds // 2                      # 30 for a 4x tokenizer; its latent (7) still fits 1,2,3,4
    err = error_of(capsys, train_args(tiny_vae_path, str(tmp_path / 'o'), '--image-size', str(size), '--steps', '1'))
    assert f'--image-size {size}' in err and 'multiple' in err and f'multiple of {ds}' in err, err
    assert not (tmp_path / 'o').exists()


def test_flags_the_command_does_not_read_are_refused(capsys, tiny_vae_path, depth1_ckpt, tmp_path):
    err = error_of(capsys, ['--sample', '--ckpt', depth1_ckpt, '--init', depth1_ckpt, '--out-dir', str(tmp_path)])
    assert '--sample' in err and 'does not read --init' in err, err
    err = error_of(capsys, train_args(tiny_vae_path, str(tmp_path / 'o'), '--steps', '1', '--num-samples', '5'))
    assert 'training does not read --num-samples' in err, err
    assert os.listdir(tmp_path) == []                                 # no samples, no training run


def test_resume_into_a_run_of_another_depth_names_both_depths(capsys, tiny_vae_path, depth1_ckpt, tmp_path):
    out = tmp_path / 'run'
    os.makedirs(out)
    shutil.copy(depth1_ckpt, out / 'ckpt.pt')
    err = error_of(capsys, train_args(tiny_vae_path, str(out), '--depth', '2', '--steps', '2', '--resume'))
    assert 'depth-1' in err and '--depth is 2' in err and '--depth 1' in err and 'key' not in err, err


def _unpickling_ran(path):
    """What PickleSideEffect runs when unpickled: it creates `path` (found by the unpickler by name)."""
    open(path, 'w').close()
    return 'ran'


class PickleSideEffect:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _unpickling_ran, (self.path,)


def test_naive_sf_resume_reads_the_checkpoint_safely(capsys, tiny_vae_path, depth1_ckpt, tmp_path):
    """naive_sf.py reads the step of the checkpoint it resumes with the project's checked loader: a file that
    needs full unpickling is refused in one line naming --trust-checkpoint, without running the pickle (it
    would create `marker`); with --trust-checkpoint the same file is read, and the run goes on."""
    out, marker = tmp_path / 'run', tmp_path / 'marker'
    ck = torch.load(depth1_ckpt, weights_only=True)
    ck['note'] = PickleSideEffect(str(marker))
    os.makedirs(out)
    torch.save(ck, out / 'ckpt.pt')
    argv = ['--schedule', 'full', *train_args(tiny_vae_path, str(out), '--steps', '2', '--resume')]
    err = error_of(capsys, argv, main=naive_sf.main)
    assert '--trust-checkpoint' in err and 'ckpt.pt' in err, err
    assert not marker.exists()
    naive_sf.main(argv + ['--trust-checkpoint'])
    assert marker.exists() and torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 2


def test_ctrl_c_saves_the_finished_steps_and_resume_continues(tiny_vae_path, tmp_path):
    out = tmp_path / 'int'
    cmd = [sys.executable, 'sar.py', *train_args(tiny_vae_path, str(out), '--steps', '100000', '--ckpt-every',
                                                 '100000', '--log-every', '1')]
    # SIGINT back to its default in the child: a suite launched in the background (`cmd &`) starts with SIGINT
    # ignored, and a child inherits that, so the Ctrl-C below would never arrive
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:                       # wait until a few steps are done, then Ctrl-C
        if line.startswith('{') and json.loads(line)['step'] >= 3:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and 'interrupted' in err and 'Traceback' not in err
    step = torch.load(out / 'ckpt.pt', weights_only=True)['step']
    assert step >= 3 and f'step {step}' in err
    sar.main(train_args(tiny_vae_path, str(out), '--steps', str(step + 1), '--resume'))
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == step + 1


def test_default_cfg_is_the_official_one_at_its_depths_for_our_checkpoints_too(monkeypatch, tiny_vae_path,
                                                                               tmp_path):
    # README: at depth >= 12 the defaults are the official ones (cfg 2.2 / 2.6 / 3.3 at d16 / d20 / d24), also
    # for a checkpoint sar.py trained (it used to sample those at the laptop's 1.5); a depth-1 model stands in
    out = str(tmp_path / 'run')
    sar.main(train_args(tiny_vae_path, out, '--steps', '1'))
    real, seen = sar.load_for_sampling, []
    monkeypatch.setattr(sar, 'sample', lambda m, v, labels, scales, cfg, *a, **k:
                        seen.append((m.depth, cfg)) or torch.zeros(len(labels), 3, 16, 16))
    for depth in (1, 16, 20, 24):
        def load(*a, **k):
            model, vae, ours = real(*a, **k)
            model.depth = depth
            return model, vae, ours
        monkeypatch.setattr(sar, 'load_for_sampling', load)
        sar.main(['--sample', '--ckpt', os.path.join(out, 'ckpt.pt'), '--classes', '0', '--num-samples', '1',
                  '--quiet', '--out-dir', str(tmp_path / f's{depth}')])
    assert seen == [(1, 1.5), (16, 2.2), (20, 2.6), (24, 3.3)]


def test_sampling_cli_outputs_and_errors(capsys, tiny_vae_path, tmp_path):
    out = str(tmp_path / 'run')
    sar.main(train_args(tiny_vae_path, out, '--steps', '1'))
    ck = os.path.join(out, 'ckpt.pt')
    sar.main(['--sample', '--ckpt', ck, '--classes', '1,3', '--num-samples', '3', '--top-k', '8', '--quiet',
              '--save-npz', str(tmp_path / 's.npz'), '--trajectory', '--save-png', '--sample-batch', '4',
              '--dtype', 'fp32'])
    with np.load(tmp_path / 's.npz') as z:
        arr, labels = z['arr_0'], z['labels']
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8 and labels.tolist() == [1, 1, 1, 3, 3, 3]
    # the .npz holds exactly the images sample() draws with one generator per image, seeded by (seed, index)
    model, vae, _ = sar.load_for_sampling(ck, None, torch.device('cpu'))
    for lo, hi in ((0, 4), (4, 6)):
        gens = [torch.Generator().manual_seed(common.step_seed(0, i)) for i in range(lo, hi)]
        img = sar.sample(model, vae, torch.tensor(labels[lo:hi]), [1, 2, 3, 4], 1.5, 8, 0.95, gens)
        assert np.array_equal(common.to_uint8(img), arr[lo:hi])
    # so another --sample-batch (less memory, as the FAQ advises) draws the same images
    sar.main(['--sample', '--ckpt', ck, '--classes', '1,3', '--num-samples', '3', '--top-k', '8', '--quiet',
              '--save-npz', str(tmp_path / 's5.npz'), '--sample-batch', '5', '--dtype', 'fp32',
              '--out-dir', str(tmp_path / 'b5')])
    with np.load(tmp_path / 's5.npz') as z:
        assert np.array_equal(z['arr_0'], arr)
    assert os.path.isfile(os.path.join(out, 'samples.png')) and os.path.isfile(os.path.join(out, 'trajectory.png'))
    assert len(os.listdir(os.path.join(out, 'samples', '3'))) == 3
    assert not [f for f in os.listdir(out) if f.startswith('.') or f.endswith('.tmp')]
    assert 'out of range' in error_of(capsys, ['--sample', '--ckpt', ck, '--classes', '12'])
    flat = str(tmp_path / 'flat.pt')
    torch.save(sar.extract_state_dict(torch.load(ck, weights_only=True)), flat)   # an official-style flat file
    assert 'names no tokenizer' in error_of(capsys, ['--sample', '--ckpt', flat])
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert 'cannot be written' in error_of(capsys, ['--sample', '--ckpt', ck, '--out-dir', str(blocker / 'sub')])
    # an .npz that cannot be written is refused before any sampling, and nothing is left behind
    t = time.time()
    err = error_of(capsys, ['--sample', '--ckpt', ck, '--num-samples', '500', '--save-npz', str(blocker / 's.npz')])
    assert 'cannot be written' in err and '--save-npz' in err and time.time() - t < 20
    assert not [f for f in os.listdir(out) if f.startswith('.')]


# ---------------------------------------------------------------------------------------------------------
# experiments/: naive student forcing (section 4.1), the exposure-bias diagnostic (section 3), the benchmark
# ---------------------------------------------------------------------------------------------------------

def naive_inputs(model, vae, gt, labels, scales, schedule, k=4, sf_input='sample', seed=0):
    return naive_sf.naive_sf_inputs(model, vae, gt, labels, scales, schedule, k, sar.SFDraw(sf_input, 50, 0.95, 1.2),
                                    torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('schedule', ['full', 'interleave', 'hybrid'])
def test_naive_sf_inputs_are_gt_exactly_where_the_schedule_says(fx, schedule):
    model, vae = fixture_var(fx), fixture_vae(fx)
    scales, labels = fx['scales'], fx['labels']
    gt, x_tf = sar.gt_tokens_and_inputs(vae, fx['images'], scales)
    x_sf = naive_inputs(model, vae, gt, labels, scales, schedule, k=scales[2])
    be, off, K = sar.begin_ends(scales), scales[0] ** 2, len(scales)
    kept = {'interleave': [i for i in range(K) if i % 2 == 0],    # 0-based scales whose input stays GT
            'hybrid': [i for i in range(K) if scales[i] <= scales[2]]}.get(schedule, [])
    for i in range(1, K):
        a, b = be[i][0] - off, be[i][1] - off
        assert torch.allclose(x_sf[:, a:b], x_tf[:, a:b]) == (i in kept), (schedule, i)


def test_sampler_with_given_maps_is_teacher_forcing():
    """generate_tokens(given=...), naive SF's rollout: the given maps come back unchanged, and the scale after
    them is predicted from them exactly as the one-pass teacher-forced forward on the same maps predicts it
    (KV cache vs block-causal mask); the scales that are drawn differ from the given ground truth."""
    model, vae = small_model(), small_vae()
    scales, labels = [1, 2, 3, 4], torch.tensor([0, 3, 7])
    gt = [torch.randint(0, 64, (3, pn * pn), generator=torch.Generator().manual_seed(pn)) for pn in scales]
    given = {0: gt[0], 1: gt[1], 2: gt[2]}
    idx, logits = sar.generate_tokens(model, vae, labels, scales, None, 50, 0.95, torch.Generator().manual_seed(5),
                                      given=given)
    assert all(torch.equal(idx[i], gt[i]) for i in given)
    with torch.no_grad():
        tf = model(labels, sar.tf_input(vae, gt, scales), scales)
    torch.testing.assert_close(logits[3], tf[:, -16:], atol=1e-4, rtol=1e-4)
    x_sf = naive_inputs(model, vae, gt, labels, scales, 'full', seed=5)
    assert not torch.allclose(x_sf, sar.tf_input(vae, gt, scales))


def test_naive_sf_cli_alternate_is_teacher_forcing_on_even_steps(tiny_vae_path, tmp_path):
    """Through the command line: 'alternate' trains exactly like teacher forcing on step 0 (same weights after
    one step), and differs from it after two (step 1 is student-forced); a resumed run keeps the parity."""
    common = ('--scale-schedule', 'fixed', '--cond-drop', '0', '--drop-path', '0', '--no-flip', '--sf-top-k', '16')
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'tf'), *common, '--steps', '1'))
    naive_sf.main(['--schedule', 'alternate', *train_args(tiny_vae_path, str(tmp_path / 'alt'), *common, '--steps',
                                                          '1')])
    wa, wb = weights(tmp_path / 'tf' / 'ckpt.pt'), weights(tmp_path / 'alt' / 'ckpt.pt')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    naive_sf.main(['--schedule', 'alternate', *train_args(tiny_vae_path, str(tmp_path / 'alt'), *common, '--steps',
                                                          '3', '--resume')])
    naive_sf.main(['--schedule', 'alternate', *train_args(tiny_vae_path, str(tmp_path / 'alt3'), *common,
                                                          '--steps', '3')])
    wa, wb = weights(tmp_path / 'alt' / 'ckpt.pt'), weights(tmp_path / 'alt3' / 'ckpt.pt')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exposure_bias_with_gt_inputs_equals_tf_loss(fx):
    model, vae = fixture_var(fx), fixture_vae(fx)
    scales = fx['scales']
    gt, x = sar.gt_tokens_and_inputs(vae, fx['images'], scales)
    with torch.no_grad():
        loss = sar.token_ce(model(fx['labels'], x, scales), torch.cat(gt, 1))
    per = diagnose.exposure_bias(model, vae, gt, fx['labels'], scales, gt)
    mean = sum(per[pn][0] * pn * pn for pn in scales) / sum(pn * pn for pn in scales)
    assert mean == pytest.approx(loss.item(), rel=1e-5)
    # the model's own greedy tokens as inputs: the coarsest scale (input = class token) is unchanged, finer ones differ
    own, _ = sar.generate_tokens(model, vae, fx['labels'], scales, None, 1, 0.0)
    per_own = diagnose.exposure_bias(model, vae, gt, fx['labels'], scales, own)
    assert per_own[scales[0]][0] == pytest.approx(per[scales[0]][0], rel=1e-5)
    assert any(abs(per_own[pn][0] - per[pn][0]) > 1e-3 for pn in scales[1:])


def test_diagnose_cli(capsys, tiny_vae_path, tmp_path):
    out = str(tmp_path / 'run')
    sar.main(train_args(tiny_vae_path, out, '--steps', '2', '--data', 'toy'))
    diagnose.main(['--ckpt', os.path.join(out, 'ckpt.pt'), '--images', '12', '--sample-batch', '8',
                   '--top-k', '8', '--sf-top-k', '8', '--quiet'])
    res = json.load(open(os.path.join(out, 'diagnose.json')))
    assert res['images'] == 12 and set(res['per_scale']) == {'teacher', 'ssr', 'rollout'}
    # the coarsest scale's input is the class token whatever the inputs are
    first = {k: res['per_scale'][k]['1']['ce'] for k in res['per_scale']}
    assert first['teacher'] == pytest.approx(first['rollout'], abs=1e-3) == pytest.approx(first['ssr'], abs=1e-3)
    assert 'rollout' in capsys.readouterr().out
    assert '--ckpt' in error_of(capsys, [], main=diagnose.main)


def test_bench_runs_and_reports_sar_parts(capsys, tiny_vae_path):
    res = bench.main(['--vae', tiny_vae_path, '--depth', '1', '--batch-size', '2', '--scales', '1,2,3,4',
                      '--image-size', '16', '--bench-steps', '2', '--mode', 'sar', '--sf-input', 'cfg'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out['ms_per_step'] > 0 and out['student_pass_ms'] > 0 and out['nograd_forward_ms'] > 0
    # FLOPs of a SAR-cfg step: 3 x the forward (fwd + bwd) + the no-grad uncond forward + 3 x the student pass
    m = sar.FlexVAR(1, 64, 1000, 32)
    f = lambda s: 2 * sum(p * p for p in s) * (12 * 64 * 64 + 64 * 64) + 4 * 64 * sum(
        p * p * sum(q * q for q in s[:i + 1]) for i, p in enumerate(s))
    args = opts('--mode', 'sar', '--sf-input', 'cfg', '--depth', '1')
    assert bench.train_flops_per_image(m.C, m.depth, m.V, [1, 2, 3, 4], args) == 4 * f([1, 2, 3, 4]) + 3 * f([1, 4])
    assert res == out


def test_smoke_pipeline_train_sh(tmp_path):
    """SMOKE=1 bash train.sh: every stage of the recipe with tiny sizes, ending in the TF vs SAR table; FLIP=1
    turns the flips on in all three trainings (toy is not flipped by default)."""
    env = dict(os.environ, SMOKE='1', OUT=str(tmp_path / 'smoke'), FLIP='1')
    r = subprocess.run(['bash', 'train.sh'], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '| TF |' in r.stdout and '| SAR |' in r.stdout
    for f in ('samples_tf.npz', 'samples_sar.npz', 'eval_tf.json', 'eval_sar.json', 'sar/ckpt.pt'):
        assert os.path.isfile(tmp_path / 'smoke' / f), f
    assert re.search(r'time per stage: tokenizer \d+ s, tf \d+ s, sar \d+ s, sampling_tf \d+ s', r.stdout)
    for ck in ('tokenizer.pt', 'tf/ckpt.pt', 'sar/ckpt.pt'):
        assert torch.load(tmp_path / 'smoke' / ck, weights_only=True)['args']['flip'] is True, ck


def imported_modules(path):
    """The top-level names of every module a Python file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names


def test_every_imported_package_is_declared():
    """A module the project imports is the standard library, a file of the project, or a distribution
    named in requirements.txt (pytest: the tests only). The import -> distribution map comes from the
    installed packages' own metadata, so PIL counts as pillow. (The scripts in tests/fixtures that made the
    fixtures from the official code are not run by anyone but a maintainer; their README names what they need.
    experiments/official_timing.py imports the official code's own modules from the clone it is given.)"""
    import importlib.metadata
    files = [os.path.join(d, f) for d in (HERE, os.path.join(HERE, 'experiments'))
             for f in sorted(os.listdir(d)) if f.endswith('.py')]
    local = {os.path.basename(f)[:-3] for f in files}
    reqs = [re.match(r'[A-Za-z0-9_.-]+', line.strip()).group(0).lower()
            for line in open(os.path.join(HERE, 'requirements.txt')) if line.strip() and line[0] != '#']
    assert {'torch', 'numpy', 'pillow', 'tqdm', 'scipy'} <= set(reqs), reqs
    dists = importlib.metadata.packages_distributions()
    undeclared = {}
    for f in files:
        tests_only = os.path.basename(f).startswith('test_')
        official = {'models', 'trainer', 'utils'} if f.endswith('official_timing.py') else set()
        for name in imported_modules(f) - set(sys.stdlib_module_names) - local - official:
            owners = {d.lower() for d in dists.get(name, [name])}
            if not owners & (set(reqs) | ({'pytest'} if tests_only else set())):
                undeclared.setdefault(name, []).append(os.path.relpath(f, HERE))
    assert not undeclared, f"imported but not in requirements.txt: {undeclared}"


# =========================================================================================================
# tokenizer.py: fixture equivalence with the official FlexVAE code, quantization, data readers,
# checkpoint I/O, CLI and a short training smoke test
# =========================================================================================================

import io
import math
import time

import torch.nn.functional as F
from PIL import Image

import tokenizer as T

MNIST = os.environ.get('MNIST', os.path.join(HERE, 'data', 'mnist'))   # the MNIST IDX folder, optional


@pytest.fixture(scope='module')
def fx_vae(fx):
    c = fx['vae_config']
    vae = T.VQVAE(codebook_size=c['codebook_size'], codebook_dim=c['codebook_embed_dim'],
                  z_channels=c['z_channels'], ch=c['base_ch'], ch_mult=c['encoder_ch_mult'],
                  num_res_blocks=c['num_res_blocks'])
    vae.load_state_dict(fx['vae_state_dict'], strict=True)
    return vae.eval()


def test_fixture_state_dict_keys_and_shapes(fx, fx_vae):
    ours = fx_vae.state_dict()
    ref = fx['vae_state_dict']
    assert list(ours.keys()) == list(ref.keys())  # same names, same order as the official module tree
    assert len(ours) == 340
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_fixture_encode_conti(fx, fx_vae):
    with torch.no_grad():
        h = fx_vae.encode_conti(fx['images'])
    assert h.shape == (2, 32, 8, 8)
    torch.testing.assert_close(h, fx['vae_h_conti'], atol=1e-4, rtol=0)


def test_fixture_tokens_per_scale(fx, fx_vae):
    idx = fx_vae.tokenize(fx['images'], fx['scales'])
    assert len(idx) == len(fx['gt_idx_per_scale'])
    for pn, a, b in zip(fx['scales'], idx, fx['gt_idx_per_scale']):
        assert a.shape == (2, pn * pn) and a.dtype == torch.int64
        assert torch.equal(a, b), f'scale {pn}'
    assert torch.equal(torch.cat(idx, 1), fx['gt_idx_cat'])


def test_fixture_tf_input(fx, fx_vae):
    with torch.no_grad():
        x = sar.tf_input(fx_vae, fx['gt_idx_per_scale'], fx['scales'])
    assert x.shape == (2, 102, 32)
    torch.testing.assert_close(x, fx['tf_input'], atol=1e-4, rtol=0)


def test_fixture_decodes(fx, fx_vae):
    with torch.no_grad():
        last = fx_vae.decode_code(fx['gt_idx_per_scale'][-1], 8)
        s3 = fx_vae.decode_code(fx['gt_idx_per_scale'][2], 3)
    assert last.shape == (2, 3, 128, 128) and s3.shape == (2, 3, 48, 48)
    torch.testing.assert_close(last, fx['vae_decode_last_scale'], atol=1e-3, rtol=0)
    torch.testing.assert_close(s3, fx['vae_decode_scale3'], atol=1e-3, rtol=0)


def test_fixture_load_tokenizer_official_layout(fx, tmp_path):
    # our checkpoint format with the fixture's config loads strictly and gives the same latent
    c = fx['vae_config']
    cfg = dict(codebook_size=c['codebook_size'], codebook_dim=c['codebook_embed_dim'],
               z_channels=c['z_channels'], ch=c['base_ch'], ch_mult=tuple(c['encoder_ch_mult']),
               num_res_blocks=c['num_res_blocks'])
    common.save_atomic({'config': cfg, 'model': fx['vae_state_dict'], 'scales': [1, 2, 3, 5, 8],
                   'image_size': 128}, tmp_path / 'tok.pt')
    vae = T.load_tokenizer(tmp_path / 'tok.pt')
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.scales == [1, 2, 3, 5, 8] and vae.image_size == 128
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_conti(fx['images']), fx['vae_h_conti'], atol=1e-4, rtol=0)
    # the official layout {'model': sd} without a config means the real FlexVAE: the tiny weights must not
    # fit, and the error names the offending keys
    common.save_atomic({'model': fx['vae_state_dict']}, tmp_path / 'official.pt')
    with pytest.raises(common.UserError) as e:
        T.load_tokenizer(tmp_path / 'official.pt')
    msg = str(e.value)
    assert 'mis-shaped' in msg and 'encoder.conv_in.weight' in msg and 'missing' in msg


def test_real_flexvae_size():
    with torch.device('meta'):
        vae = T.VQVAE()  # defaults = the released FlexVAE
    sd = vae.state_dict()
    assert len(sd) == 344
    assert sum(p.numel() for p in vae.parameters()) == 72_049_827
    assert vae.downsample == 16
    assert sd['quantize.codebook_used'].shape == (65536,)
    assert sd['quantize.embedding.weight'].shape == (8912, 32)
    assert sd['quant_conv.weight'].shape == (32, 256, 1, 1)
    assert sd['post_quant_conv.weight'].shape == (256, 32, 1, 1)
    assert sd['decoder.conv_in.weight'].shape == (512, 256, 3, 3)
    assert sd['encoder.conv_out.weight'].shape == (256, 512, 3, 3)
    nin = sorted(k for k in sd if 'nin_shortcut.weight' in k)
    assert nin == ['decoder.conv_blocks.1.res.0.nin_shortcut.weight',
                   'decoder.conv_blocks.3.res.0.nin_shortcut.weight',
                   'encoder.conv_blocks.2.res.0.nin_shortcut.weight',
                   'encoder.conv_blocks.4.res.0.nin_shortcut.weight']
    assert sd['encoder.conv_blocks.2.res.0.nin_shortcut.weight'].shape == (256, 128, 1, 1)
    assert sd['decoder.conv_blocks.1.res.0.nin_shortcut.weight'].shape == (256, 512, 1, 1)
    assert len([k for k in sd if k.startswith('decoder.conv_blocks.0.attn.') and k.endswith('q.weight')]) == 3
    assert not any(k.startswith('encoder.conv_blocks.3.attn') for k in sd)


# ----------------------------------------------------------------------------- quantization and scales

def small_tok(**kw):
    cfg = dict(codebook_size=64, codebook_dim=8, z_channels=16, ch=16, ch_mult=(1, 2), num_res_blocks=1)
    cfg.update(kw)
    torch.manual_seed(0)
    return T.VQVAE(**cfg).eval()


def test_quantize_is_nearest_code_brute_force():
    vae = small_tok()
    z = torch.randn(3, 8, 5, 7)
    idx = vae.quantize(z)
    assert idx.shape == (3, 35) and idx.dtype == torch.int64
    # brute force in float64: Euclidean distance between unit vectors, one position at a time, row-major order
    cb = vae.quantize.embedding.weight.double()
    cb = cb / cb.norm(dim=1, keepdim=True)
    for b in range(3):
        for y in range(5):
            for x in range(7):
                v = z[b, :, y, x].double()
                v = v / v.norm()
                best = int(((cb - v) ** 2).sum(1).argmin())
                assert idx[b, y * 7 + x].item() == best
    # the embedded vectors are unit-norm codebook rows at those indices
    e = vae.codebook()[idx]
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3, 35))


def test_tokenize_embed_upsample_tf_input():
    vae = small_tok()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    scales = [1, 2, 3, 8]
    idx = vae.tokenize(x, scales)
    assert [t.shape for t in idx] == [(2, 1), (2, 4), (2, 9), (2, 64)]
    h = vae.encode_conti(x)
    # scale 1 = the quantized mean of the latent; full scale = the latent itself (area pooling is exact there)
    assert torch.equal(idx[0], vae.quantize(h.mean((2, 3), keepdim=True)))
    assert torch.equal(idx[-1], vae.quantize(h))
    e = vae.embed(idx[2], 3)
    assert e.shape == (2, 8, 3, 3)
    torch.testing.assert_close(e[1, :, 2, 0], vae.codebook()[idx[2][1, 6]])  # row-major: (y=2, x=0) -> 6
    tf = sar.tf_input(vae, idx, scales)
    assert tf.shape == (2, 4 + 9 + 64, 8)
    # bicubic upsampling of a 1x1 map is constant: the first 4 inputs all equal the scale-1 code
    torch.testing.assert_close(tf[:, :4], vae.codebook()[idx[0]].expand(2, 4, 8))
    up = F.interpolate(vae.embed(idx[2], 3), size=(8, 8), mode='bicubic', align_corners=False)
    torch.testing.assert_close(sar.scale_shift(vae, idx[2], 3, 8), up.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tf[:, 13:], up.flatten(2).transpose(1, 2))
    with torch.no_grad():
        assert vae.decode_code(idx[1], 2).shape == (2, 3, 4, 4)
        assert vae.decode_code(idx[-1], 8).shape == (2, 3, 16, 16)


def test_load_tokenizer_mismatch_lists_keys(tmp_path):
    vae = small_tok()
    sd = vae.state_dict()
    sd['extra.weight'] = torch.zeros(1)
    del sd['post_quant_conv.bias']
    common.save_atomic({'config': vae.config, 'model': sd}, tmp_path / 'x.pt')
    with pytest.raises(common.UserError) as e:
        T.load_tokenizer(tmp_path / 'x.pt')
    msg = str(e.value)
    assert '1 missing key(s): post_quant_conv.bias' in msg and '1 unexpected key(s): extra.weight' in msg, msg
    assert 'mis-shaped' not in msg and str(tmp_path / 'x.pt') in msg
    with pytest.raises(common.UserError) as e:
        T.load_tokenizer(tmp_path / 'nope.pt')
    assert 'nope.pt' in str(e.value)


# ----------------------------------------------------------------------------- checkpoint I/O

def test_save_atomic_and_load_checkpoint(tmp_path):
    p = tmp_path / 'sub' / 'ck.pt'
    common.save_atomic({'step': 3, 'w': torch.arange(4)}, p)
    assert os.listdir(p.parent) == ['ck.pt']  # no temporary file left behind
    ck = common.load_checkpoint(p)
    assert ck['step'] == 3 and torch.equal(ck['w'], torch.arange(4))
    # a failing write keeps the previous file intact and removes the temporary file
    with pytest.raises(Exception):
        common.save_atomic({'f': lambda: 0}, p)  # lambdas cannot be pickled
    assert os.listdir(p.parent) == ['ck.pt'] and common.load_checkpoint(p)['step'] == 3
    # objects outside the weights_only allow-list need the trust flag
    import argparse
    common.save_atomic({'args': argparse.Namespace(a=1)}, p)
    with pytest.raises(common.UserError, match='if you trust this file, pass --trust-checkpoint'):
        common.load_checkpoint(p)
    assert common.load_checkpoint(p, trust=True)['args'].a == 1
    with pytest.raises(common.UserError, match='checkpoint not found: .*missing.pt'):
        common.load_checkpoint(tmp_path / 'missing.pt')
    (tmp_path / 'notes.pt').write_text('hello, not a checkpoint')  # a text file, with or without trust
    for trust in (False, True):
        with pytest.raises(common.UserError, match='notes.pt is not a checkpoint'):
            common.load_checkpoint(tmp_path / 'notes.pt', trust=trust)
    # random bytes (a damaged download) are called damaged: trusting the file would not help
    (tmp_path / 'noise.pt').write_bytes(np.random.default_rng(0).integers(0, 256, 100, np.uint8).tobytes())
    with pytest.raises(common.UserError, match='noise.pt is not a checkpoint torch can read .damaged') as e:
        common.load_checkpoint(tmp_path / 'noise.pt')
    assert 'trust' not in str(e.value)


def test_save_image_grid(tmp_path):
    imgs = torch.full((5, 3, 4, 6), -1.0)
    imgs[1] = 1.0
    common.save_image_grid(imgs, tmp_path / 'g.png', nrow=3)
    a = np.asarray(Image.open(tmp_path / 'g.png'))
    assert a.shape == (2 + 2 * (4 + 2), 2 + 3 * (6 + 2), 3)  # 2 rows x 3 columns with 2 px gaps
    assert (a[2:6, 2:8] == 0).all() and (a[2:6, 10:16] == 255).all()
    assert not os.path.exists(str(tmp_path / 'g.png') + '.tmp')


# ----------------------------------------------------------------------------- data

def test_toy_dataset_deterministic_and_class_dependent():
    a = data.load_dataset('toy', 32, 'train', seed=0)
    b = data.load_dataset('toy', 32, 'train', seed=0)
    c = data.load_dataset('toy', 32, 'train', seed=1)
    v = data.load_dataset('toy', 32, 'val', seed=0)
    assert a.num_classes == 10 and len(a.class_names) == 10 and len(a) == len(a.labels) > len(v) > 0
    x0, y0 = a[123]
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32 and -1 <= x0.min() and x0.max() <= 1
    assert torch.equal(x0, b[123][0]) and y0 == b[123][1] == a.labels[123]
    assert not torch.equal(x0, c[123][0])  # the seed changes the images
    assert not torch.equal(a[5][0], v[5][0])  # train and val are different samples
    assert np.bincount(a.labels).min() == np.bincount(a.labels).max()  # balanced classes
    # class decides the global structure: a nearest-class-mean classifier on raw pixels separates the classes
    tr = torch.stack([a[i][0] for i in range(300)]).flatten(1)
    ytr = torch.tensor(a.labels[:300])
    means = torch.stack([tr[ytr == k].mean(0) for k in range(10)])
    te = torch.stack([v[i][0] for i in range(100)]).flatten(1)
    acc = (torch.cdist(te, means).argmin(1) == torch.tensor(v.labels[:100])).float().mean()
    assert acc > 0.8, acc
    # within-class variation: two samples of the same class differ noticeably
    assert (a[0][0] - a[10][0]).abs().mean() > 0.05
    all_ = data.load_dataset('toy', 16, 'all')
    assert len(all_) == len(a) + len(v) and all_[len(a)][0].shape == (3, 16, 16)


def make_folder(root):
    """Class folders 'cat' and 'ant' with good images in several modes and four bad files."""
    os.makedirs(root / 'cat')
    os.makedirs(root / 'ant' / 'nested')
    good = {}
    Image.new('RGB', (40, 30), (200, 10, 10)).save(root / 'cat' / 'red.png'); good['red'] = (200, 10, 10)
    Image.new('RGB', (32, 32), (10, 200, 10)).save(root / 'cat' / 'green.jpg', quality=95)
    good['green'] = (10, 200, 10)
    Image.new('L', (32, 32), 100).save(root / 'ant' / 'gray.png'); good['gray'] = (100, 100, 100)
    Image.new('CMYK', (32, 32), (0, 255, 255, 0)).save(root / 'ant' / 'cmyk.jpg', quality=95)
    good['cmyk'] = (255, 0, 0)
    Image.new('RGBA', (32, 32), (10, 20, 230, 128)).save(root / 'ant' / 'nested' / 'rgba.png')
    good['rgba'] = (10, 20, 230)
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(root / 'ant' / 'deep16.png')
    good['deep16'] = (156, 156, 156)  # 40000 / 257 = 155.6
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, 'JPEG')
    (root / 'cat' / 'truncated.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / 'cat' / 'empty.png').write_bytes(b'')
    (root / 'cat' / 'notes.txt').write_text('not an image')
    (root / 'ant' / 'fake.jpg').write_text('not a jpeg either')
    return good


def test_image_folder_good_and_bad_files(tmp_path, capsys):
    good = make_folder(tmp_path)
    ds = data.load_dataset(str(tmp_path), 16, 'all')
    err = capsys.readouterr().err
    assert ds.class_names == ['ant', 'cat'] and ds.num_classes == 2  # sorted names -> ids
    assert 'skipped 3' in err and str(tmp_path) in err  # empty.png, notes.txt, fake.jpg found when listing
    assert len(ds) == 7  # 6 good + the truncated JPEG, whose header is fine
    seen = {}
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
        name = os.path.splitext(os.path.basename(ds.files[i]))[0]
        seen[name] = (x, y)
    err = capsys.readouterr().err
    assert 'truncated.jpg' in err and 'skipped' in err  # reported when first decoded
    assert ds.labels[ds.files.index(str(tmp_path / 'cat' / 'red.png'))] == 1
    for name, rgb in good.items():
        x, _ = seen[name]
        got = ((x.mean((1, 2)) + 1) * 127.5).tolist()
        assert np.allclose(got, rgb, atol=4), (name, got, rgb)
    # the truncated file's slot was filled with another good image
    assert any(torch.equal(seen['truncated'][0], seen[n][0]) for n in good)


def test_image_folder_split_and_train_val_layout(tmp_path):
    for c in ('a', 'b'):
        os.makedirs(tmp_path / 'flat' / c)
        for i in range(20):
            Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / 'flat' / c / f'{i}.png')
    tr = data.load_dataset(str(tmp_path / 'flat'), 8, 'train')
    va = data.load_dataset(str(tmp_path / 'flat'), 8, 'val')
    assert len(tr) + len(va) == 40 and len(va) == 2 and sorted(va.labels) == [0, 1]  # 5%, stratified
    assert not set(tr.files) & set(va.files)
    assert va.files == data.load_dataset(str(tmp_path / 'flat'), 8, 'val').files  # deterministic
    for s in ('train', 'val'):
        os.makedirs(tmp_path / 'tv' / s / 'k')
        Image.new('RGB', (8, 8)).save(tmp_path / 'tv' / s / 'k' / f'{s}.png')
    assert data.load_dataset(str(tmp_path / 'tv'), 8, 'val').files[0].endswith('val.png')
    assert len(data.load_dataset(str(tmp_path / 'tv'), 8, 'all')) == 2


def test_missing_or_empty_dataset_names_path(tmp_path):
    for bad in (tmp_path / 'nope', tmp_path / 'empty', tmp_path / 'noimg'):
        if bad.name != 'nope':
            os.makedirs(bad / 'cls')
        if bad.name == 'noimg':
            (bad / 'cls' / 'a.txt').write_text('x')
        with pytest.raises(common.UserError) as e:
            data.load_dataset(str(bad), 32)
        assert str(bad) in str(e.value)
    (tmp_path / 'x.npz').write_bytes(b'junk')
    with pytest.raises(common.UserError, match='x.npz is not a valid .npz'):
        data.load_dataset(str(tmp_path / 'x.npz'), 32)


def test_npz_reader_nhw_and_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    nhw = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 4
    np.savez(tmp_path / 'g.npz', images=nhw, labels=labels)
    ds = data.load_dataset(str(tmp_path / 'g.npz'), 28, 'all')
    x, y = ds[7]
    assert x.shape == (3, 28, 28) and y == 3 and ds.num_classes == 4
    # grey copied to all channels
    torch.testing.assert_close(x[1], torch.from_numpy(nhw[7]).float() / 127.5 - 1)
    nhwc = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / 'c.npz', images=nhwc, labels=labels)
    ds = data.load_dataset(str(tmp_path / 'c.npz'), 16, 'all')
    torch.testing.assert_close(ds[5][0], torch.from_numpy(nhwc[5]).permute(2, 0, 1).float() / 127.5 - 1)
    assert data.load_dataset(str(tmp_path / 'c.npz'), 8, 'all')[0][0].shape == (3, 8, 8)  # resized
    tr, va = (data.load_dataset(str(tmp_path / 'c.npz'), 16, s) for s in ('train', 'val'))
    assert len(tr) + len(va) == 40 and len(va) == 2
    np.savez(tmp_path / 'f.npz', images=nhwc.astype(np.float32))
    with pytest.raises(common.UserError, match='uint8'):
        data.load_dataset(str(tmp_path / 'f.npz'), 16)
    # NCHW (a torch tensor's layout) is read as the same images (fid.py reads it too: test_fid.py)
    np.savez(tmp_path / 'chw.npz', images=nhwc.transpose(0, 3, 1, 2), labels=labels)
    ds_chw, ds_hwc = (data.load_dataset(str(tmp_path / f), 16, 'all') for f in ('chw.npz', 'c.npz'))
    assert all(torch.equal(ds_chw[i][0], ds_hwc[i][0]) for i in (0, 5, 39))
    np.savez(tmp_path / 'two.npz', images=np.zeros((4, 2, 8, 8), np.uint8))
    with pytest.raises(common.UserError, match=r'\(N, C, H, W\)'):
        data.load_dataset(str(tmp_path / 'two.npz'), 8)


def test_flips_default_on_for_colour_photos_only(tmp_path):
    """flip=None (the scripts' default below depth 12) turns random flips on for colour images and leaves them
    off for the same images in grey (stored as RGB, with JPEG-like noise) and for the toy set; an explicit
    flip wins. `python data.py SPEC` names the kind that train.sh picks its recipe by."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    grey = colour.mean(-1, keepdims=True) + rng.integers(-2, 3, (40, 16, 16, 3))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    for name, imgs, photos in (('c', colour, True), ('g', grey, False)):
        path = str(tmp_path / f'{name}.npz')
        np.savez(path, images=imgs, labels=np.arange(40) % 4)
        ds = data.load_dataset(path, 16, 'train', flip=None)
        assert ds.flip is photos and data.load_dataset(path, 16, 'train', flip=False).flip is False
        x = ds[3][0]
        seen = {ds[(3, s)][0].numpy().tobytes() for s in range(16)}
        mirrors = {x.numpy().tobytes(), x.flip(-1).numpy().tobytes()}
        assert seen == (mirrors if photos else {x.numpy().tobytes()})
        r = subprocess.run([sys.executable, 'data.py', path], cwd=HERE, capture_output=True, text=True)
        assert r.stdout.strip() == ('photos' if photos else 'other'), r.stderr
    assert data.load_dataset('toy', 16, 'train', flip=None).flip is False
    assert opts('--depth', '4').flip is None and opts('--depth', '16').flip is True


def test_idx_folder_with_more_than_ten_classes(tmp_path):
    """An IDX folder (EMNIST-style: 28 px, 12 classes here) gets one class per label id, not MNIST's 10, and is
    padded to 32 px like MNIST; labels that skip an id are refused in one line."""
    def write_idx(path, arr):  # the IDX format: 0, 0, type 0x08, ndim, big-endian sizes, the bytes
        with open(path, 'wb') as f:
            f.write(bytes([0, 0, 8, arr.ndim]) + b''.join(n.to_bytes(4, 'big') for n in arr.shape) + arr.tobytes())
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), np.arange(60, dtype=np.uint8) % 12
    write_idx(tmp_path / 't10k-images-idx3-ubyte', images)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', labels)
    tr, va = data.load_dataset(str(tmp_path), 32, 'train'), data.load_dataset(str(tmp_path), 32, 'val')
    assert tr.num_classes == va.num_classes == 12 and len(tr) + len(va) == 60
    x, y = tr[0]
    assert x.shape == (3, 32, 32) and (x[:, :2] == -1).all() and 0 <= y < 12     # a black 2 px border
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', (labels * 2).astype(np.uint8))   # ids 0, 2, 4, ...
    with pytest.raises(common.UserError, match='every id used'):
        data.load_dataset(str(tmp_path), 32, 'train')


@pytest.mark.skipif(not os.path.isdir(MNIST), reason='MNIST not found: set MNIST=<folder with the IDX files>')
def test_mnist_reader_split_and_padding():
    tr = data.load_dataset(MNIST, 32, 'train')
    va = data.load_dataset(MNIST, 32, 'val')
    assert (len(tr), len(va)) == (8000, 2000) and tr.num_classes == 10
    # stratified: each class has 20% of its test-split images in val (counts from the MNIST README)
    counts = np.array([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert np.abs(np.bincount(va.labels, minlength=10) - 0.2 * counts).max() <= 1
    x, y = va[0]
    assert x.shape == (3, 32, 32) and 0 <= y <= 9
    assert (x[:, :2, :] == -1).all() and (x[:, :, -2:] == -1).all()  # padded with black, not resized
    assert torch.equal(x[0], x[2]) and x.max() > 0.9
    assert data.load_dataset(MNIST, 64, 'val')[0][0].shape == (3, 64, 64)


# ----------------------------------------------------------------------------- CLI and training

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, 'tokenizer.py'), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=120, env=dict(os.environ, TQDM_DISABLE='1'))


def test_help_documents_every_flag():
    parser = T.get_parser()
    opts = [a for a in parser._actions if a.option_strings and a.dest != 'help']
    assert {'--data', '--image-size', '--out', '--steps', '--batch-size', '--lr', '--codebook-size',
            '--codebook-dim', '--ch', '--ch-mult', '--z-channels', '--num-res-blocks', '--scales',
            '--ckpt-every', '--resume', '--seed', '--device', '--workers', '--eval-only', '--trust-checkpoint',
            '--crop'} <= \
        {s for a in opts for s in a.option_strings}
    for a in opts:
        assert a.help and len(a.help) > 10, a.option_strings
    r = run_cli('--help')
    assert r.returncode == 0
    for a in opts:
        assert a.option_strings[0] in r.stdout


def test_cli_errors_are_one_line(tmp_path, capsys):
    # in-process (fast); main() turns every user error into one 'error: ...' line and exit status 2
    for args, needle in ((['--data', str(tmp_path / 'missing')], 'missing'),
                         (['--scales', '1,3,2'], 'increasing'),
                         (['--scales', '1,2,16'], 'latent'),
                         (['--ch-mult', '1,x'], 'ch-mult'),
                         (['--eval-only', str(tmp_path / 'none.pt')], 'none.pt')):
        with pytest.raises(SystemExit) as e:
            T.main(args + ['--steps', '1', '--out', str(tmp_path / 'o.pt')])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error:') and needle in err[0], err
    assert not os.path.exists(tmp_path / 'o.pt')


TINY = ['--data', 'toy', '--image-size', '16', '--ch', '8', '--ch-mult', '1,2', '--z-channels', '8',
        '--num-res-blocks', '1', '--codebook-size', '16', '--codebook-dim', '4', '--scales', '1,2,4,8',
        '--batch-size', '4', '--eval-images', '8', '--ckpt-every', '2']


def test_train_smoke_checkpoint_and_resume(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'tok.pt')
    lr_at, seen = common.lr_at, []
    monkeypatch.setattr(T, 'lr_at', lambda *a, **k: seen.append((a, k)) or lr_at(*a, **k))
    T.main(TINY + ['--steps', '3', '--out', out])
    # the learning rate follows the shared 'lin0' schedule: warm-up 5% of the steps (at least 1), end at 10%
    assert seen == [((s, 3, 2e-3, 1), dict(end_frac=0.1, hold_frac=0.0)) for s in range(3)]
    ck = common.load_checkpoint(out)
    assert ck['step'] == 3 and ck['scales'] == [1, 2, 4, 8] and ck['image_size'] == 16
    assert ck['config']['codebook_size'] == 16 and not os.path.exists(out + '.tmp')
    printed = capsys.readouterr().out
    assert 'PSNR' in printed and all(f'  {pn}  ' in printed for pn in (1, 2, 4, 8))
    assert os.path.exists(str(tmp_path / 'tok_recon.png'))
    w3 = ck['model']['decoder.conv_out.weight']
    T.main(TINY + ['--steps', '5', '--out', out, '--resume'])
    assert 'resumed' in capsys.readouterr().out
    ck = common.load_checkpoint(out)
    assert ck['step'] == 5 and not torch.equal(ck['model']['decoder.conv_out.weight'], w3)
    vae = T.load_tokenizer(out)
    assert vae.scales == [1, 2, 4, 8] and vae.image_size == 16 and vae.downsample == 2
    # the PNG has one row of originals plus one row per scale
    png = np.asarray(Image.open(str(tmp_path / 'tok_recon.png')))
    assert png.shape[0] == 2 + 5 * (16 + 2)


def test_kmeans_init_and_dead_code_restart():
    vae = small_tok(codebook_size=8, codebook_dim=8)
    centres = torch.nn.functional.normalize(torch.randn(8, 8), dim=1)
    g = torch.Generator().manual_seed(0)

    def fake_encode(x):  # latents scattered tightly around 8 directions, (B, 8, 4, 4)
        pick = centres[torch.randint(8, (x.shape[0] * 16,), generator=g)]
        z = pick + 0.02 * torch.randn(pick.shape, generator=g)
        return z.view(x.shape[0], 4, 4, 8).permute(0, 3, 1, 2) * 3.0
    vae.encode_conti = fake_encode
    batches = iter([(torch.zeros(16, 3, 8, 8), None)] * 16)
    T.kmeans_init(vae, batches)
    cos = centres @ vae.codebook().t()  # (8 centres, 8 codes)
    assert cos.max(1).values.min() > 0.99  # every cluster got a code on it
    # restarts: codes unused for longer than `patience` move onto encoder outputs; Adam moments are cleared
    w = vae.quantize.embedding.weight
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.ones_like(w)
    opt.step()
    last_used = torch.tensor([100, 100, 0, 100, 100, 100, 0, 100])
    h = fake_encode(torch.zeros(2, 3, 8, 8))
    assert T.restart_dead_codes(vae, opt, last_used, 100, h, patience=50) == 2
    zn = torch.nn.functional.normalize(h.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    for k in (2, 6):
        assert (zn @ torch.nn.functional.normalize(w[k], dim=0)).max() > 0.99
        assert opt.state[w]['exp_avg'][k].abs().sum() == 0 and last_used[k] == 100
    assert opt.state[w]['exp_avg'][0].abs().sum() > 0


# ----------------------------------------------------------------------------- helpers shared by the scripts

def test_to_uint8_one_rounding_rule():
    m = torch.arange(-8, 521)  # x = m / 256 - 1 is exact in float32; covers [-1, 1] and values to clamp
    x = (m.float() / 256 - 1).view(-1, 1, 1, 1).expand(-1, 3, 1, 2)
    got = common.to_uint8(x)
    xd = np.clip(m.numpy() / 256 - 1, -1, 1)
    want = np.floor((xd + 1) * 127.5 + 0.5).astype(np.uint8)  # torchvision save_image's rule, in float64
    assert got.shape == (len(m), 1, 2, 3) and got.dtype == np.uint8
    assert (got == want[:, None, None, None]).all()
    assert got[m.tolist().index(256)].max() == 128  # x = 0 -> 127.5 -> 128
    # uint8 -> [-1, 1] (what the data readers return) -> uint8 is the identity
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    assert (common.to_uint8(data.to_tensor(a)[None])[0] == a).all()


def test_parse_ints_scales_and_check_scales():
    assert common.parse_ints('1, 2,3', '--x') == [1, 2, 3] and common.parse_ints('4_8', '--x') == [4, 8]
    for bad in ('', '1,a', '0,1', '-2', '1.5'):
        with pytest.raises(common.UserError, match='--ch-mult'):
            common.parse_ints(bad, '--ch-mult')
    assert common.parse_scales('1,2,4') == [1, 2, 4]
    for bad, why in (('4', 'at least two'), ('1,3,3', 'increasing'), ('2,1', 'increasing'),
                     ('1,x', 'integers')):
        with pytest.raises(common.UserError, match=why) as e:
            common.parse_scales(bad, '--sample-scales')
        assert '--sample-scales' in str(e.value)
    common.check_scales([1, 2, 16], 16)
    with pytest.raises(common.UserError, match='the finest scale must be <= 8'):
        common.check_scales([1, 2, 16], 8)


def test_lr_at_lin0_closed_form():
    peak = 2.0
    assert common.lr_at(0, 100, peak, 10, 0.1, 0.0) == pytest.approx(0.005 * peak)
    assert common.lr_at(5, 100, peak, 10, 0.1, 0.0) == pytest.approx(peak * (0.005 + 0.995 * 0.5))
    assert common.lr_at(10, 100, peak, 10, 0.1, 0.0) == pytest.approx(peak)
    assert common.lr_at(55, 100, peak, 10, 0.1, 0.0) == pytest.approx(peak * (1 - 0.9 * 0.5))  # half-way down
    assert common.lr_at(100, 100, peak, 10, 0.1, 0.0) == pytest.approx(0.1 * peak)
    assert common.lr_at(50, 100, peak, 10, 0.1, 0.5) == pytest.approx(peak)  # inside the hold
    assert common.lr_at(100, 100, peak, 10, 0.1, 0.5) == pytest.approx(0.1 * peak)


def test_load_state_dict_strict_report():
    m = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(6)])  # 12 keys
    sd = {k: torch.full_like(v, 7.0) for k, v in m.state_dict().items()}
    common.load_state_dict_strict(m, sd, 'x')
    assert (m[3].weight == 7).all()  # it did load
    sd = {f'extra.{i}': torch.zeros(1) for i in range(10)}
    sd['0.weight'] = torch.zeros(3, 2)
    with pytest.raises(common.UserError) as e:
        common.load_state_dict_strict(m, sd, 'ckpt.pt')
    msg = str(e.value)
    assert msg.startswith('ckpt.pt does not match the model: 11 missing key(s): 0.bias, 1.weight, 1.bias,'), \
        msg
    assert '10 unexpected key(s): extra.0, ' in msg and 'extra.8' not in msg and msg.count(' ...') == 2
    assert msg.endswith('1 mis-shaped key(s): 0.weight file (3, 2) vs model (2, 2)'), msg


def test_group_norm_of_a_single_value_is_its_bias():
    # tiny configs (one channel per group) decoding one 1x1 map: torch refuses, we return what it would
    # compute
    n = T.Norm(16)
    torch.nn.init.normal_(n.weight)
    torch.nn.init.normal_(n.bias)
    x = torch.randn(1, 16, 1, 1)
    ref = F.group_norm(torch.cat([x, 2 * x]), 16, n.weight, n.bias, 1e-6)[:1]  # batch of 2 is accepted
    torch.testing.assert_close(n(x), ref, atol=1e-3, rtol=0)  # torch's one-pass variance adds ~1e-4 noise
    assert torch.equal(n(x), n.bias.view(1, 16, 1, 1).expand(1, 16, 1, 1))
    y = torch.randn(2, 16, 3, 3)
    assert torch.equal(n(y), F.group_norm(y, 16, n.weight, n.bias, 1e-6))


# ----------------------------------------------------------------------------- the official random crop

def test_random_crop_short_side_distribution_and_box_halving(monkeypatch):
    assert data.crop_side_range(256) == (256, 291) and data.crop_side_range(512) == (512, 582)  # ceil(S / 0.88)
    assert data.crop_side_range(22) == (22, 25)  # 22 / 0.88 = 25 exactly: no extra pixel from float rounding
    calls = []
    resize = Image.Image.resize

    def spy(self, size, resample=None, *a, **k):
        calls.append((self.size, tuple(size), resample))
        return resize(self, size, resample, *a, **k)
    monkeypatch.setattr(Image.Image, 'resize', spy)
    rng = np.random.default_rng(0)
    img = Image.new('RGB', (90, 70))
    sides = []
    for _ in range(1500):
        calls.clear()
        assert data.random_crop(img, 64, rng).size == (64, 64)
        (src, dst, filt), = calls  # 70 < 2 x 64: no halving, one bicubic resize
        assert src == (90, 70) and filt == Image.BICUBIC and dst[0] == round(90 * dst[1] / 70)
        sides.append(dst[1])
    counts = np.bincount(sides)[64:]
    assert len(counts) == 10 and counts.min() > 100 and counts.max() < 200  # 64..73, ~150 each: uniform
    # a large input is first halved with BOX while its short side is >= 2 x the drawn side, then bicubic
    for seed in range(4):
        calls.clear()
        data.random_crop(Image.new('RGB', (2100, 1500)), 256, np.random.default_rng(seed))
        s = calls[-1][1][1]
        expect, (w, h) = [], (2100, 1500)
        while h >= 2 * s:
            expect.append(((w, h), (w // 2, h // 2), Image.BOX))
            w, h = w // 2, h // 2
        assert 256 <= s <= 291 and len(expect) == 2 and calls[:-1] == expect
        assert calls[-1] == ((w, h), (round(w * s / h), s), Image.BICUBIC)


def test_random_crop_dataset_seeded_and_val_centre(tmp_path):
    rng = np.random.default_rng(0)
    for c in 'ab':
        os.makedirs(tmp_path / c)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / c / f'{i}.png')
    tr = data.load_dataset(str(tmp_path), 32, 'train', crop='random')
    x, y = tr[(3, 123)]
    assert x.shape == (3, 32, 32) and y == tr.labels[3]
    torch.manual_seed(5)
    a = tr[(3, 7)][0]
    torch.manual_seed(6)
    assert torch.equal(tr[(3, 7)][0], a)  # the seed alone decides, not torch's RNG
    assert len({tr[(3, s)][0].numpy().tobytes() for s in range(8)}) >= 6  # different seeds, different crops
    torch.manual_seed(1)
    b = tr[3][0]
    torch.manual_seed(1)
    assert torch.equal(tr[3][0], b)  # without a seed: torch's RNG (which DataLoader seeds per worker)
    # the val split always uses the centre crop
    va = data.load_dataset(str(tmp_path), 32, 'val', crop='random')
    centre = data.load_dataset(str(tmp_path), 32, 'val')
    assert torch.equal(va[(0, 1)][0], va[(0, 2)][0]) and torch.equal(va[0][0], centre[0][0])
    # the other datasets accept (i, seed) and have no random crop; with flip the seed decides the flip
    toy = data.load_dataset('toy', 16, 'val')
    assert torch.equal(toy[(4, 99)][0], toy[4][0])
    flip = data.load_dataset('toy', 16, 'val', flip=True)
    assert torch.equal(flip[(4, 3)][0], flip[(4, 3)][0])
    assert {flip[(4, s)][0].numpy().tobytes() for s in range(16)} == \
        {toy[4][0].numpy().tobytes(), toy[4][0].flip(-1).numpy().tobytes()}
    with pytest.raises(common.UserError, match='crop'):
        data.load_dataset('toy', 16, crop='corner')


def test_512px_latent_is_32x32_and_every_scale_is_area_pooled(tmp_path):
    # the official 512 px setting: a 16x-downsampling tokenizer gives a 32x32 latent and the scale list
    # stops at 16, so every scale, 16 included, is area-pooled from that latent
    os.makedirs(tmp_path / 'k')
    img = np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / 'k' / 'a.png')
    x = data.load_dataset(str(tmp_path), 512, 'all', crop='random')[(0, 3)][0][None]
    assert x.shape == (1, 3, 512, 512)
    vae = small_tok(ch=8, ch_mult=(1, 1, 1, 1, 1), z_channels=8)
    assert vae.downsample == 16
    scales = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    with torch.no_grad():
        h = vae.encode_conti(x)
    assert h.shape == (1, 8, 32, 32)
    idx = vae.tokenize(x, scales)
    for pn, t in zip(scales, idx):
        pooled = F.interpolate(h, (pn, pn), mode='area')
        assert t.shape == (1, pn * pn) and torch.equal(t, vae.quantize(pooled)), pn
        if 32 % pn == 0:  # area pooling = the mean of each (32/pn) x (32/pn) block of latent cells
            k = 32 // pn
            torch.testing.assert_close(pooled, h.view(1, 8, pn, k, pn, k).mean((3, 5)))
    assert not torch.equal(idx[-1], vae.quantize(h[:, :, ::2, ::2]))  # pooled, not subsampled


# ----------------------------------------------------------------------------- bad input: one line, early

def tok_error(capsys, argv):
    """tokenizer.main in-process; asserts exit status 2 and a single stderr line, which it returns."""
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


@pytest.mark.parametrize('flag, value, needle', [
    ('--steps', '0', '--steps must be >= 1'), ('--steps', '-3', '--steps must be >= 1'),
    ('--batch-size', '0', '--batch-size must be >= 1'), ('--lr', '-1', '--lr must be a finite number > 0'),
    ('--lr', 'nan', '--lr must be a finite number'), ('--image-size', '0', '--image-size must be >= 1'),
    ('--image-size', '15', 'not a multiple of the downsample factor 2'),
    ('--eval-images', '0', '--eval-images'),
    ('--ckpt-every', '0', '--ckpt-every'), ('--codebook-size', '0', '--codebook-size'),
    ('--beta', '-0.5', '--beta'), ('--device', 'nonsense', "--device 'nonsense'")])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, monkeypatch, flag, value, needle):
    monkeypatch.setattr(T, 'load_dataset',
                        lambda *a, **k: pytest.fail('data read before the flags were checked'))
    err = tok_error(capsys, TINY + [flag, value, '--out', str(tmp_path / 'o' / 'tok.pt')])
    assert needle in err, err
    assert os.listdir(tmp_path) == []


def test_tokenizer_device_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    # train.sh passes no --device: the tokenizer, like sar.py, must then use a GPU that is there
    args = T.get_parser().parse_args([])
    assert args.device == 'auto'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    T.check_args(args)
    assert args.device == 'cpu'
    args = T.get_parser().parse_args([])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    T.check_args(args)
    assert args.device == 'cuda'


def test_training_split_smaller_than_a_batch_is_refused(tmp_path, capsys):
    # used to hang: with full batches only, an epoch of 5 images at batch 8 holds no batch, forever
    np.savez(tmp_path / 's.npz', images=np.zeros((6, 16, 16, 3), np.uint8), labels=np.arange(6) % 2)
    out = tmp_path / 'tok.pt'
    t0 = time.time()
    err = tok_error(capsys, TINY + ['--data', str(tmp_path / 's.npz'), '--batch-size', '8',
                                    '--out', str(out)])
    assert 'has 5 image(s), fewer than one batch (--batch-size 8)' in err and time.time() - t0 < 10
    assert not out.exists()


@pytest.mark.parametrize('labels, needle', [
    (np.array([0, 1, -1, 0, 1, 0]), "'labels' must be >= 0"),
    (np.array([0., 1.5, 1, 0, 1, 0]), "'labels' must be integers"),
    (np.array([1000, 1001, 1002, 1003, 1000, 1001]), 'remap them to 0..3')])
def test_npz_labels_are_validated(tmp_path, capsys, labels, needle):
    np.savez(tmp_path / 'l.npz', images=np.zeros((6, 8, 8), np.uint8), labels=labels)
    with pytest.raises(common.UserError, match=re.escape(needle)):
        data.load_dataset(str(tmp_path / 'l.npz'), 8, 'all')
    err = tok_error(capsys, TINY + ['--data', str(tmp_path / 'l.npz'), '--out', str(tmp_path / 'o.pt')])
    assert needle in err and 'l.npz' in err and not os.path.exists(tmp_path / 'o.pt')


def test_text_file_named_npz(tmp_path, capsys):
    (tmp_path / 'fake.npz').write_text('a text file, renamed')
    err = tok_error(capsys, TINY + ['--data', str(tmp_path / 'fake.npz'), '--out', str(tmp_path / 'o.pt')])
    assert 'fake.npz is not a valid .npz file' in err and 'pickled' not in err


def test_one_image_val_split_and_unwritable_out(tmp_path, capsys):
    for c in 'ab':  # 20 images: the held-out split gets exactly one
        os.makedirs(tmp_path / 'd' / c)
        for i in range(10):
            colour = (25 * i, 200 if c == 'a' else 0, 50)
            Image.new('RGB', (20, 18), colour).save(tmp_path / 'd' / c / f'{i}.png')
    assert len(data.load_dataset(str(tmp_path / 'd'), 16, 'val')) == 1
    out = tmp_path / 'tok.pt'
    T.main(TINY + ['--data', str(tmp_path / 'd'), '--steps', '2', '--ae-warmup', '0', '--workers', '0',
                   '--out', str(out)])
    table = capsys.readouterr().out
    assert '(1 images;' in table and out.exists() and (tmp_path / 'tok_recon.png').exists()
    rows = [line for line in table.splitlines() if re.fullmatch(r'\s+\d+\s+\d+\s+\d+\s+\S+', line)]
    psnr = [float(line.split()[-1]) for line in rows]
    assert len(psnr) == 4 and all(math.isfinite(v) for v in psnr)
    # an --out that cannot be written fails before the training run, not after it
    (tmp_path / 'file').write_text('x')
    for bad in (tmp_path / 'file' / 'tok.pt', tmp_path / 'd'):
        t0 = time.time()
        err = tok_error(capsys, TINY + ['--steps', '100000', '--out', str(bad)])
        assert str(bad) in err and time.time() - t0 < 10, err


def test_unreadable_image_warned_once_across_epochs_and_workers(tmp_path, capfd):
    make_folder(tmp_path)
    ds = data.load_dataset(str(tmp_path), 16, 'all')
    capfd.readouterr()
    for _ in range(2):  # two epochs, each with fresh worker processes
        for _ in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2):
            pass
    err = capfd.readouterr().err
    assert err.count('truncated.jpg') == 1, err


def test_error_in_a_worker_process_is_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / 'd' / 'k')
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, 'JPEG')
    for i in range(3):  # headers fine, pixel data cut: found only when a worker decodes them
        (tmp_path / 'd' / 'k' / f'{i}.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(SystemExit) as e:
        T.main(TINY + ['--data', str(tmp_path / 'd'), '--workers', '1', '--batch-size', '1', '--no-flip',
                       '--out', str(tmp_path / 'o.pt')])  # --no-flip: no colour check decodes in this process
    # the DataLoader re-raises the worker's error with its traceback: still one line, after the progress bar
    err = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith('tokenizer:')]
    assert e.value.code == 2 and err == [f"error: no image under {tmp_path / 'd'} could be decoded"], err


def test_empty_class_folder_is_ignored_and_val_takes_train_ids(tmp_path, capsys):
    for c in ('a', 'b_empty', 'c'):
        os.makedirs(tmp_path / 'f' / c / 'sub')
    (tmp_path / 'f' / 'b_empty' / 'readme.txt').write_text('no images here')
    for c in ('a', 'c'):
        for i in range(3):
            Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / 'f' / c / f'{i}.png')
    ds = data.load_dataset(str(tmp_path / 'f'), 8, 'all')
    err = capsys.readouterr().err.strip().splitlines()
    assert ds.class_names == ['a', 'c'] and ds.num_classes == 2 and sorted(set(ds.labels)) == [0, 1]
    assert len(err) == 1 and err[0].startswith('warning:') and 'b_empty' in err[0], err
    # DIR/train + DIR/val: val's labels are train's class ids, also when val lacks a class
    for split, classes in (('train', 'ab'), ('val', 'b')):
        for c in classes:
            os.makedirs(tmp_path / 'tv' / split / c)
            Image.new('RGB', (8, 8)).save(tmp_path / 'tv' / split / c / '0.png')
    va = data.load_dataset(str(tmp_path / 'tv'), 8, 'val')
    assert va.class_names == ['a', 'b'] and va.labels == [1]


def test_ctrl_c_prints_interrupted(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, 'train', interrupted)
    with pytest.raises(SystemExit) as e:
        T.main(['--out', str(tmp_path / 'o.pt')])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == 'interrupted'


@pytest.mark.skipif(__import__('platform').libc_ver()[0] != 'glibc', reason="glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_repeated_large_tensors():
    """By default glibc unmaps a freed 64 MB block, so every new one faults its 16,384 pages in again; after
    keep_freed_memory() the heap settles within a few rounds of the same tensors and then reuses its memory
    (page faults counted by the kernel, in a fresh process each; 8 rounds of 4 x 64 MB)."""
    code = ("import resource, sys, torch, cpu_speed\n"
            "cpu_speed.keep_freed_memory() if sys.argv[1] == '1' else None\n"
            "for _ in range(8):\n"
            "    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    ts = [torch.ones(16 << 20) for _ in range(4)]\n"
            "    del ts\n"
            "    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)")
    default, kept = [[int(n) for n in subprocess.run([sys.executable, '-c', code, k], cwd=HERE, check=True,
                                                     capture_output=True, text=True).stdout.split()]
                     for k in '01']
    assert kept[-1] * 20 < min(default), (default, kept)      # (transparent huge pages fault fewer, larger)


# (cpu_speed.set_threads: test_fid.py::test_set_threads_explicit_env_or_free_cores, with fid.py's copy)


# ---- the second study (experiments/study2.sh) ----
import study2_summary as S2  # noqa: E402


def chart_pixel(x, y, xlim, ylim):
    """Where study2_summary.chart puts data (x, y): the axis ends sit INSET pixels inside the plot frame."""
    a, b = S2.LEFT + S2.INSET, S2.W - S2.RIGHT - S2.INSET
    top, bottom = S2.TOP + S2.INSET, S2.H - S2.BOTTOM - S2.INSET
    return (round(a + (x - xlim[0]) / (xlim[1] - xlim[0]) * (b - a)),
            round(bottom - (y - ylim[0]) / (ylim[1] - ylim[0]) * (bottom - top)))


def near(img, xy, color, r=2):
    """Whether a pixel of `color` lies within r pixels of xy."""
    return any(img.getpixel((xy[0] + i, xy[1] + j)) == color for i in range(-r, r + 1) for j in range(-r, r + 1))


def test_study2_chart_draws_the_data_where_the_axes_say():
    line = S2.chart([dict(label='rising', x=[0, 10], y=[0, 10])], title='a title', xlabel='x', ylabel='y')
    assert line.size == (640, 400)
    at = lambda x, y: chart_pixel(x, y, (0, 10), (0, 10))      # data 0..10: ticks 0, 2, ..., 10
    assert all(near(line, at(v, v), S2.COLORS[0]) for v in (1, 2.5, 5, 7.5, 9))         # on y = x
    assert not any(near(line, at(x, y), S2.COLORS[0]) for x, y in ((5, 9), (5, 1), (9, 5), (1, 5)))
    px = np.asarray(line)
    assert (px[:S2.TOP - 5] != 255).any() and (px[S2.H - 20:] != 255).any()             # title, x label
    # an error bar: y = 5 +- 2 at x = 5 spans 3..7 (the y axis runs 3..7); the bar stands where the data say
    bar = S2.chart([dict(label='flat', x=[0, 5, 10], y=[5, 5, 5], err=[0, 2, 0])])
    at = lambda x, y: chart_pixel(x, y, (0, 10), (3, 7))
    assert near(bar, at(5, 6.5), S2.COLORS[0], 0) and near(bar, at(5, 3.5), S2.COLORS[0], 0)
    assert not near(bar, at(2.5, 6.5), S2.COLORS[0]) and not near(bar, at(7.5, 3.5), S2.COLORS[0])


def fake_study2(root, fids):
    """A study folder as study2.sh leaves it, with made-up numbers: fids {(part, setting, seed, step): FID}."""
    for (part, setting, seed, step), fid in fids.items():
        run = root / 'toy' / part / setting / f's{seed}'
        point = run / f'at_{step:04d}'
        point.mkdir(parents=True)
        (point / 'eval.json').write_text(json.dumps(dict(fid=fid, acc=0.5)))
        per = {k: {'1': dict(ce=1.0, acc=0.5), '2': dict(ce=2.0 + fid, acc=0.5)} for k in ('teacher', 'ssr', 'rollout')}
        (point / 'diagnose.json').write_text(json.dumps(dict(per_scale=per, token_mean_ce=dict(
            teacher=1.5, ssr=2.0, rollout=3.0))))
        with open(run / 'log.jsonl', 'a') as f:
            f.write(json.dumps(dict(step=step, imgs_per_s=8.0)) + '\n')


def test_study2_summary_pairs_seeds_and_picks_the_best_gamma(tmp_path, capsys):
    tf, g001, g01, g1, al = [10, 12, 11], [8.0, 13.5, 12.0], [9, 11, 10], [13, 13, 13], [10.2, 10.4, 10.0]
    fids = {('sweep', s, seed, 60): v[seed] for s, v in (('tf', tf), ('sar_g0.01', g001), ('sar_g0.1', g01),
                                                        ('sar_g1.0', g1), ('sar_all_g0.1', al)) for seed in range(3)}
    fids.update({('budget', s, seed, k): 10 + seed - k / 60 * (s != 'tf') for s in ('tf', 'sar_g0.1')
                 for seed in range(3) for k in (60, 120)})
    fake_study2(tmp_path, fids)
    (tmp_path / 'toy' / 'best_gamma.txt').write_text('0.1\n')          # the choices study2.sh writes down
    (tmp_path / 'toy' / 'budget.txt').write_text('sar_g0.1 tf\n')
    d = str(tmp_path / 'toy')
    # means: tf 11, 0.01 11.17 (though it holds the lowest single run, 8.0), 0.1 10, 1.0 13, all 10.2
    assert S2.best_gamma(d, ['0.01', '0.1', '1.0']) == '0.1'
    assert S2.best_settings(d, 2, ['tf', 'sar_g0.01', 'sar_g0.1', 'sar_g1.0', 'sar_all_g0.1']) == \
        ['sar_g0.1', 'sar_all_g0.1']
    S2.main([str(tmp_path), '16'])
    out = capsys.readouterr().out
    res = json.load(open(tmp_path / 'results.json'))
    assert res['best_gamma'] == {'toy': 0.1} and res['budget'] == {'toy': ['sar_g0.1', 'tf']}
    rows = res['runs']
    assert len(rows) == 15 + 12
    get = lambda **kw: [r for r in rows if all(r[k] == v for k, v in kw.items())]
    # gamma 0.01: FID 11.17 ± 2.84 over the seeds; paired with tf of the same seed, -2, +1.5, +1: +0.17 ± 1.89
    assert [r['fid_minus_tf'] for r in get(part='sweep', setting='sar_g0.01')] == pytest.approx([-2, 1.5, 1])
    assert '| sar_g0.01 | 60 | 3 | 11.17 ± 2.84 | +0.17 ± 1.89 |' in out
    # the budget pairs at the same step: sar - tf = -k/60
    assert {r['fid_minus_tf'] for r in get(part='budget', setting='sar_g0.1', step=120)} == {-2}
    assert get(part='sweep', setting='sar_all_g0.1')[0]['gamma'] == 0.1 and get(setting='tf')[0]['gamma'] is None
    assert {r['s_per_step'] for r in rows} == {2.0}                                    # 16 images / 8 per s
    # t(0.975, 2) x 1.893 / sqrt(3) = 4.303 x 1.093 = 4.70
    assert 'tf vs sar (gamma 0.01) differences over n = 3 seeds: 4.70' in out
    from PIL import Image
    assert Image.open(tmp_path / 'plots' / 'fid_vs_gamma.png').size == (640, 400)      # one dataset: 1 panel
    assert Image.open(tmp_path / 'plots' / 'per_scale_ce.png').size == (640, 400)
    assert not (tmp_path / 'plots' / 'scratch.png').exists()                           # no scratch runs


def test_study2_same_weights_check(tmp_path, capsys):
    ck = lambda w: dict(step=4, model={'w': torch.tensor([1.0, w])},
                        optimizer=dict(state={0: dict(exp_avg=torch.zeros(2), step=torch.tensor(4.0))}))
    for name, w in (('a', 2.0), ('b', 2.0), ('c', 2.5)):
        torch.save(ck(w), tmp_path / f'{name}.pt')
    S2.main(['--same-weights', str(tmp_path / 'a.pt'), str(tmp_path / 'b.pt')])
    assert 'bit-identical after 4 steps' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        S2.main(['--same-weights', str(tmp_path / 'a.pt'), str(tmp_path / 'c.pt')])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count('\n') == 0 and 'model.w (max |difference| 0.5)' in err


@pytest.mark.parametrize('var, value, needle', [
    ('STEPS', '0', 'STEPS must be a positive integer'), ('GAMMAS', '0.1 big', 'GAMMAS must be numbers'),
    ('SEEDS', '0,1', 'SEEDS must be integers'), ('EVAL_EVERY', '7', 'must divide BUDGET_MULT x STEPS (300)'),
    ('DATASETS', 'cifar', 'DATASETS takes toy and/or mnist'), ('MNIST', '/nowhere', 'MNIST not found at /nowhere')])
def test_study2_bad_variables_fail_in_one_line(tmp_path, var, value, needle):
    # PYTHON=false: were a bad value let through, the first stage would fail at once instead of training
    env = dict(os.environ, OUT=str(tmp_path / 'out'), PYTHON='false', DATASETS='toy mnist', MNIST=str(tmp_path))
    env[var] = value
    p = subprocess.run(['bash', os.path.join(HERE, 'experiments', 'study2.sh')], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and needle in p.stderr, p.stderr
    assert not (tmp_path / 'out').exists()                                             # nothing started


# --------------------------------------------------------------------------------------------------------
# experiments/official_timing.py: the official side of docs/benchmarks.md, same flags and JSON keys as bench.py
# --------------------------------------------------------------------------------------------------------
OFFICIAL = os.path.join(HERE, '..', 'shared', 'peer', 'official')    # a clone of GengzeZhou/SAR, if present
TINY_TIMING = ['--device', 'cpu', '--depth', '1', '--batch-size', '2', '--image-size', '32', '--scales', '1,2',
               '--dtype', 'fp32', '--bench-steps', '2']


def official_timing(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, 'experiments', 'official_timing.py'), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('where', ['absent', 'no_such_folder', 'not_a_clone'])
def test_official_timing_bad_path_fails_in_one_line(tmp_path, where):
    (tmp_path / 'trainer.py').write_text('')                    # one official file is not a clone
    flag = {'absent': [], 'no_such_folder': ['--official', str(tmp_path / 'nowhere')],
            'not_a_clone': ['--official', str(tmp_path)]}[where]
    p = official_timing(*flag, *TINY_TIMING)
    assert p.returncode == 2 and p.stdout == '', p.stderr
    assert p.stderr.startswith('error: ') and p.stderr.count('\n') == 1 and '--official' in p.stderr, p.stderr


@pytest.mark.parametrize('mode', [['--mode', 'tf'], ['--sampling']])
def test_official_timing_prints_the_keys_of_bench(tmp_path, capsys, mode):
    if not os.path.isfile(os.path.join(OFFICIAL, 'trainer.py')):
        pytest.skip(f"no clone of the official SAR code at {OFFICIAL}")
    p = official_timing('--official', OFFICIAL, *TINY_TIMING, *mode)
    assert p.returncode == 0, p.stderr
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    ours = bench.main([*TINY_TIMING, *mode])
    capsys.readouterr()
    assert list(theirs) == list(ours) and (theirs['side'], ours['side']) == ('official', 'ours')
    same = ['depth', 'batch', 'scales', 'device', 'dtype'] + (['params_M', 'mode'] if 'tf' in mode else ['cfg'])
    assert {k: theirs[k] for k in same} == {k: ours[k] for k in same}      # same configuration, same model size
    assert theirs['ms_per_step' if 'tf' in mode else 's_per_batch'] > 0
    import ratio
    for side, res in (('ours', ours), ('official', theirs)):
        (tmp_path / side).write_text(f"step 0: 1.0 ms\n{json.dumps(res)}\n")
    key = 'ms_per_step' if 'tf' in mode else 's_per_batch'
    assert ratio.main([str(tmp_path / 'official'), str(tmp_path / 'ours')])[key] == \
        pytest.approx(ours[key] / theirs[key], rel=1e-2, abs=1e-3)


def gpu_bench(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, 'experiments', 'gpu_bench.py'), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_gpu_bench_bad_official_fails_in_one_line_and_writes_nothing(tmp_path):
    p = gpu_bench('--official', str(tmp_path / 'nowhere'), '--tiny', '--parts', 'ab',
                  '--json', str(tmp_path / 'g.json'))
    assert p.returncode == 2 and p.stderr.startswith('error: ') and p.stderr.count('\n') == 1, p.stderr
    assert '--official' in p.stderr and os.listdir(tmp_path) == []


def test_gpu_bench_update_refuses_a_json_of_another_commit_and_leaves_it(tmp_path):
    out = tmp_path / 'gpu.json'
    out.write_text(json.dumps(dict(commit='0000000', card='cpu', config=[], parts={'ab': 'then'})))
    before = out.read_text()
    p = gpu_bench('--official', OFFICIAL, '--tiny', '--parts', 'laptop', '--update', '--json', str(out))
    if 'no trainer.py' in p.stderr:
        pytest.skip(f"no clone of the official SAR code at {OFFICIAL}")
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and 'commit' in p.stderr, p.stderr
    assert out.read_text() == before and os.listdir(tmp_path) == ['gpu.json']


def test_gpu_bench_dry_run_writes_the_medians_ratios_laptop_time_and_ddp_line(tmp_path):
    if not os.path.isfile(os.path.join(OFFICIAL, 'trainer.py')):
        pytest.skip(f"no clone of the official SAR code at {OFFICIAL}")
    out = tmp_path / 'gpu.json'
    p = gpu_bench('--official', OFFICIAL, '--tiny', '--rounds', '1', '--parts', 'ab', '--json', str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert 'laptop_pipeline_s' not in res and list(res['parts']) == ['ab']
    # the second part added to the same file (one command per part, where a command's time is limited)
    p = gpu_bench('--official', OFFICIAL, '--tiny', '--parts', 'laptop', '--update', '--json', str(out),
                  env=dict(os.environ, SMOKE='1'))                       # the laptop part: train.sh SMOKE=1
    assert p.returncode == 0, p.stderr
    res = {**res, **json.loads(out.read_text())}
    for row, key in (('tf', 'ms_per_step'), ('sar_argmax', 'ms_per_step'), ('sar_cfg', 'ms_per_step'),
                     ('sampling', 'images_per_s')):
        runs = res['runs'][row]
        assert [r['side'] for r in runs['official'] + runs['ours']] == ['official', 'ours']
        assert {k: runs['official'][0][k] for k in ('depth', 'batch', 'scales', 'dtype')} == \
            {k: runs['ours'][0][k] for k in ('depth', 'batch', 'scales', 'dtype')}       # the same configuration
        med = res['medians'][row]
        assert (med['official'], med['ours']) == (runs['official'][0][key], runs['ours'][0][key])
        name = 'sampling_speedup' if row == 'sampling' else f'{row}_ratio'
        assert res[name] == pytest.approx(med['ours'] / med['official'], abs=1e-3)
    assert res['card'] == 'cpu' and res['mfu_tf'] is None and res['laptop_pipeline_s'] > 0
    assert sorted(res['parts']) == ['ab', 'laptop'] and res['rounds'] == 1 and res['laptop_tf_ms'] > 0
    assert res['laptop_split'].startswith('time per stage: tokenizer')
    assert [ln.split(' | ')[0][:4] for ln in res['laptop_table'].splitlines()] == ['| ch', '|---', '| TF', '| SA']
    assert ' x 1, cpu DDP gloo, step 0' in res['ddp_start_line']                 # torchrun of 1 process: DDP
    assert res['commit'] and res['torch'] == torch.__version__
    profiles = ['gpu_profile_laptop_tf.txt', 'gpu_profile_sampling.txt', 'gpu_profile_tf.txt']
    for name in profiles:                                                        # where a step's time goes
        text = (tmp_path / name).read_text()
        assert text.startswith('wall ') and 'aten::' in text, name
    assert sorted(os.listdir(tmp_path)) == ['gpu.json'] + profiles              # no temporary file left
