"""Tests of sar.py. Fixture tests compare with vectors computed by the official SAR/FlexVAR code
(tests/fixtures/flexvar_tiny.pt, see its README); the rest check invariants and closed forms.
Run: python -m pytest -q test_sar.py"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import sar
import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'tests', 'fixtures', 'flexvar_tiny.pt')


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
    sar.load_state_dict_strict(model, sd)
    return model.eval()


def opts(*argv):
    return sar.resolve_defaults(sar.get_parser().parse_args(list(argv)))


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
    assert torch.equal(sar.attn_bias(fx['scales']), fx['attn_bias'])


def test_fixture_sf_logits(fx):
    model, vae = fixture_var(fx), fixture_vae(fx)
    k = fx['sf_scale_index']
    src = fx['tf_logits'][:, sum(p * p for p in fx['scales'][:k]):sum(p * p for p in fx['scales'][:k + 1])].argmax(-1)
    assert torch.equal(src, fx['sf_src_idx'])
    with torch.no_grad():
        logits, which = sar.student_pass(model, vae, fx['labels'], {k: src}, fx['scales'], 'last')
    assert which == [len(fx['scales']) - 1]
    torch.testing.assert_close(logits, fx['sf_logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('mode', ['tf', 'sar'])
def test_fixture_training_step_losses_and_grad_norms(fx, mode):
    """One official step (argmax SF, last transition, teacher target, gamma 0.01, no dropout)."""
    ref = fx['train_step']
    model, vae = fixture_var(fx), fixture_vae(fx)
    o = opts('--mode', mode, '--cond-drop', '0', '--sf-input', 'argmax', '--gamma', str(ref['sigma']))
    gt, x = sar.gt_tokens_and_inputs(vae, fx['images'], fx['scales'])
    loss, info = sar.compute_losses(model, vae, gt, x, fx['labels'], fx['scales'], o)
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
    img, logits, idx = sar.sample(model, vae, fx['labels'], ai['infer_patch_nums'], cfg=ai['cfg'], top_k=ai['top_k'],
                                  top_p=ai['top_p'], cfg_form=form, max_pn=ai['max_pn'], return_logits=True)
    for a, b in zip(idx, ref['indices_per_scale']):
        assert torch.equal(a, b)
    for a, b in zip(logits, ref['cfg_logits_per_scale']):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
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


def test_block_causal_mask_matches_definition():
    scales = [1, 2, 4, 5]
    m = sar.block_causal_mask(scales)
    d = [i for i, pn in enumerate(scales) for _ in range(pn * pn)]
    for q in range(len(d)):
        for k in range(len(d)):
            assert bool(m[q, k]) == (d[q] >= d[k])


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
            x = vae.tf_input([drawn[j] for j in range(i + 1)], prefix)
            one = model(lab, x, prefix)[:, be[i][0]:be[i][1]]
            torch.testing.assert_close(all_logits[:, be[i][0] - 1:be[i][1] - 1], one, atol=1e-5, rtol=0)


def test_teacher_targets_carry_no_gradient():
    """L_SAR's gradient = grad L_TF + gamma * grad CE(student logits, fixed tokens): the teacher-forced
    prediction used as the CSF target is a constant (drawn without grad)."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    images, labels = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([2, 5])
    gt, x = sar.gt_tokens_and_inputs(vae, images, scales)
    o = opts('--mode', 'sar', '--cond-drop', '0', '--sf-input', 'argmax', '--sf-transitions', 'all', '--gamma', '0.5')
    loss, info = sar.compute_losses(model, vae, gt, x, labels, scales, o)
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


def test_cfg_sf_uncond_pass_is_outside_autograd():
    """The unconditional logits only serve to sample SF inputs: the loss graph must not contain them
    (the official code backpropagates through them for nothing). With the same RNG, the loss with
    --sf-input cfg has the same gradient as recomputing it from the drawn tokens."""
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    images, labels = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([2, 5])
    gt, x = sar.gt_tokens_and_inputs(vae, images, scales)
    o = opts('--mode', 'sar', '--cond-drop', '0', '--sf-input', 'cfg', '--sf-top-k', '20')
    calls = []
    hook = model.head.register_forward_hook(lambda m, i, out: calls.append(torch.is_grad_enabled()))
    loss, _ = sar.compute_losses(model, vae, gt, x, labels, scales, o, torch.Generator().manual_seed(0))
    hook.remove()
    assert calls == [True, False, True]   # TF pass with grad, uncond pass without, student pass with grad


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
    g = torch.Generator().manual_seed(3)
    _, logits, idx = sar.sample(model, vae, labels, scales, cfg=0.0, top_k=10, top_p=0.9, generator=g,
                                cfg_form='llamagen', return_logits=True)   # cfg 0 in llamagen form = uncond only
    g = torch.Generator().manual_seed(3)
    _, logits_c, idx_c = sar.sample(model, vae, labels, scales, cfg=1.0, top_k=10, top_p=0.9, generator=g,
                                    cfg_form='llamagen', return_logits=True)  # cfg 1 = cond only
    with torch.no_grad():
        x = vae.tf_input(idx_c, scales)
        tf = model(labels, x, scales)
        tf_unc = model(torch.full_like(labels, 10), vae.tf_input(idx, scales), scales)
    torch.testing.assert_close(torch.cat(logits_c, 1), tf, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(logits, 1), tf_unc, atol=1e-4, rtol=0)


def test_sampling_same_seed_same_images():
    model, vae, scales = small_model(), small_vae(), [1, 2, 3, 4]
    labels = torch.tensor([0, 1, 2, 3])
    run = lambda s: sar.sample(model, vae, labels, scales, 2.0, 20, 0.95, torch.Generator().manual_seed(s))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_npz_stream_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    w = sar.NpzStream(str(tmp_path / 's.npz'), 7, 5, 6)
    w.write(imgs[:4], labels[:4])
    w.write(imgs[4:], labels[4:])
    w.close()
    with np.load(tmp_path / 's.npz') as z:
        assert np.array_equal(z['arr_0'], imgs) and np.array_equal(z['labels'], labels)
    assert not os.path.exists(tmp_path / 's.npz.tmp')


# ---------------------------------------------------------------------------------------------------------
# training schedules
# ---------------------------------------------------------------------------------------------------------

def test_random_scale_schedule_matches_official_statistics():
    """Spec 3.1 (simulated with the official function, 2e5 draws): last scale 16: 66.6%, 15: 13.7%,
    14: 10.2%, 13: 6.4%, 12: 2.8%; length 8: 39%, 9: 48%; mean L 591, min 311, max 680."""
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


def test_lr_schedule_closed_form():
    f = lambda s: sar.lr_at(s, 1000, 1.0, 100, 0.1, 0.05)
    assert f(0) == pytest.approx(0.005) and f(50) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(100) == 1.0 and f(145) == 1.0                      # hold 5% of the 900 post-warm-up steps
    assert f(1000) == pytest.approx(0.1)
    assert f(145 + 855 // 2) == pytest.approx(1 - 0.9 * (855 // 2) / 855, abs=2e-3)


def test_weight_decay_groups():
    groups = sar.param_groups(small_model(), 0.05)
    decay = {id(p) for p in groups[0]['params']}
    m = small_model()
    names = {n for n, p in m.named_parameters()}
    groups = sar.param_groups(m, 0.05)
    decay = {n for n, p in m.named_parameters() if any(p is q for q in groups[0]['params'])}
    assert 'pos_1LC' not in decay and 'pos_start' not in decay and 'blocks.0.attn.scale_mul_1H11' not in decay
    assert {'class_emb.weight', 'head.weight', 'word_embed.weight', 'blocks.0.ada_lin.1.weight'} <= decay
    assert not any(n.endswith('bias') for n in decay) and names - decay


# ---------------------------------------------------------------------------------------------------------
# the training loop: resume, DDP, errors
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_vae_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('vae') / 'vae.pt')
    v = small_vae(V=64)
    tokenizer.save_atomic({'config': v.config, 'model': v.state_dict(), 'image_size': 16, 'scales': [1, 2, 3, 4]}, path)
    return path


def train_args(vae, out, *extra):
    return ['--vae', vae, '--depth', '1', '--image-size', '16', '--scales', '1,2,3,4', '--batch-size', '4',
            '--out-dir', out, '--quiet', '--workers', '0', '--log-every', '1', '--sf-top-k', '16', *extra]


def weights(path):
    return sar.extract_state_dict(torch.load(path, weights_only=True))


def test_resume_continues_exactly(tiny_vae_path, tmp_path):
    common = ('--mode', 'sar', '--steps', '6', '--ckpt-every', '100', '--sf-input', 'sample')
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'a'), *common))
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'b'), *common, '--stop-at', '3'))
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 3
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'b'), *common, '--resume'))
    wa, wb = weights(tmp_path / 'a' / 'ckpt.pt'), weights(tmp_path / 'b' / 'ckpt.pt')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w3 = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert w3['step'] == 6


def test_ddp_two_processes_equal_one_process(tiny_vae_path, tmp_path):
    common = ('--steps', '3', '--scale-schedule', 'fixed', '--cond-drop', '0', '--drop-path', '0', '--no-flip',
              '--mode', 'sar', '--sf-input', 'argmax')
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


def error_of(capsys, argv):
    with pytest.raises(SystemExit) as e:
        sar.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err
    return err


def test_errors_bad_scales(capsys, tiny_vae_path, tmp_path):
    assert 'strictly increasing' in error_of(capsys, ['--scales', '1,3,2'])
    assert 'latent' in error_of(capsys, train_args(tiny_vae_path, str(tmp_path), '--scales', '1,2,3,4,8'))


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
    with pytest.raises(sar.UserError, match='head.bias.*extra.weight'):
        sar.load_state_dict_strict(model, sd)


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
    assert 'trust' in err
    sar.main(train_args(tiny_vae_path, str(tmp_path / 'o'), '--init', path, '--steps', '1', '--trust-checkpoint'))
    assert torch.load(tmp_path / 'o' / 'ckpt.pt', weights_only=True)['step'] == 1


def test_sampling_cli_outputs_and_errors(capsys, tiny_vae_path, tmp_path):
    out = str(tmp_path / 'run')
    sar.main(train_args(tiny_vae_path, out, '--steps', '1'))
    ck = os.path.join(out, 'ckpt.pt')
    sar.main(['--sample', '--ckpt', ck, '--classes', '1,3', '--num-samples', '3', '--top-k', '8', '--quiet',
              '--save-npz', str(tmp_path / 's.npz'), '--trajectory', '--save-png'])
    with np.load(tmp_path / 's.npz') as z:
        assert z['arr_0'].shape == (6, 16, 16, 3) and z['arr_0'].dtype == np.uint8
        assert z['labels'].tolist() == [1, 1, 1, 3, 3, 3]
    assert os.path.isfile(os.path.join(out, 'samples.png')) and os.path.isfile(os.path.join(out, 'trajectory.png'))
    assert len(os.listdir(os.path.join(out, 'samples', '3'))) == 3
    assert 'out of range' in error_of(capsys, ['--sample', '--ckpt', ck, '--classes', '12'])
    flat = str(tmp_path / 'flat.pt')
    torch.save(sar.extract_state_dict(torch.load(ck, weights_only=True)), flat)   # an official-style flat file
    assert 'names no tokenizer' in error_of(capsys, ['--sample', '--ckpt', flat])
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert 'cannot write' in error_of(capsys, ['--sample', '--ckpt', ck, '--out-dir', str(blocker / 'sub')])


# ---------------------------------------------------------------------------------------------------------
# naive student forcing (section 4.1) and the exposure-bias diagnostic (section 3)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('schedule', ['full', 'alternate', 'interleave', 'hybrid'])
def test_naive_sf_modes_one_step_on_fixture(fx, schedule):
    """Each schedule trains one step on the fixture model; its inputs are GT exactly where the schedule says."""
    model, vae = fixture_var(fx), fixture_vae(fx)
    scales, labels = fx['scales'], fx['labels']
    gt, x_tf = sar.gt_tokens_and_inputs(vae, fx['images'], scales)
    o = opts('--mode', 'sf', '--sf-schedule', schedule, '--sf-hybrid-k', str(scales[2]), '--cond-drop', '0',
             '--sf-input', 'sample', '--sf-top-k', '50')
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for step in (0, 1):  # alternate: step 0 is TF, step 1 is SF
        loss, info = sar.compute_losses(model, vae, gt, x_tf, labels, scales, o, torch.Generator().manual_seed(0), step=step)
        assert torch.isfinite(loss)
        loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    x_sf = sar.naive_sf_inputs(model, vae, gt, labels, scales, o, torch.Generator().manual_seed(0))
    be = sar.begin_ends(scales)
    off = scales[0] ** 2
    K = len(scales)   # 0-based scales whose input stays GT: interleave = 1-based odd; hybrid@k = side <= k
    kept = {'interleave': [i for i in range(K) if i % 2 == 0],
            'hybrid': [i for i in range(K) if scales[i] <= scales[2]]}.get(schedule, [])
    for i in range(1, len(scales)):
        a, b = be[i][0] - off, be[i][1] - off
        same = torch.allclose(x_sf[:, a:b], x_tf[:, a:b])
        assert same == (i in kept), (schedule, i)
    # alternate's even steps are exactly teacher forcing
    if schedule == 'alternate':
        model.eval()
        l_tf, _ = sar.compute_losses(model, vae, gt, x_tf, labels, scales, opts('--mode', 'tf', '--cond-drop', '0'))
        l_alt, _ = sar.compute_losses(model, vae, gt, x_tf, labels, scales, o, step=2)
        assert l_alt.item() == pytest.approx(l_tf.item(), rel=1e-6)


def test_naive_sf_rollout_is_the_sampler():
    """The full-SF inputs are built from exactly the tokens the sampler generates with the same generator."""
    model, vae = small_model(), small_vae()
    scales, labels = [1, 2, 3, 4], torch.tensor([0, 3, 7])
    o = opts('--mode', 'sf', '--sf-input', 'sample', '--sf-top-k', '20', '--sf-top-p', '0.9')
    gt = [torch.randint(0, 64, (3, pn * pn)) for pn in scales]
    x_sf = sar.naive_sf_inputs(model, vae, gt, labels, scales, o, torch.Generator().manual_seed(5))
    own, _ = sar.generate_tokens(model, vae, labels, scales, None, 20, 0.9, torch.Generator().manual_seed(5),
                                 official_grid=False)
    torch.testing.assert_close(x_sf, vae.tf_input(own, scales))
    assert not torch.allclose(x_sf, vae.tf_input(gt, scales))


def test_exposure_bias_with_gt_inputs_equals_tf_loss(fx):
    model, vae = fixture_var(fx), fixture_vae(fx)
    scales = fx['scales']
    gt, x = sar.gt_tokens_and_inputs(vae, fx['images'], scales)
    with torch.no_grad():
        loss = sar.token_ce(model(fx['labels'], x, scales), torch.cat(gt, 1))
    per = sar.exposure_bias(model, vae, gt, fx['labels'], scales, gt)
    mean = sum(per[pn][0] * pn * pn for pn in scales) / sum(pn * pn for pn in scales)
    assert mean == pytest.approx(loss.item(), rel=1e-5)
    # the model's own greedy tokens as inputs: the coarsest scale (input = class token) is unchanged, finer ones differ
    own, _ = sar.generate_tokens(model, vae, fx['labels'], scales, None, 1, 0.0)
    per_own = sar.exposure_bias(model, vae, gt, fx['labels'], scales, own)
    assert per_own[scales[0]][0] == pytest.approx(per[scales[0]][0], rel=1e-5)
    assert any(abs(per_own[pn][0] - per[pn][0]) > 1e-3 for pn in scales[1:])


def test_diagnose_cli(capsys, tiny_vae_path, tmp_path):
    out = str(tmp_path / 'run')
    sar.main(train_args(tiny_vae_path, out, '--steps', '2', '--data', 'toy'))
    sar.main(['--diagnose', '--ckpt', os.path.join(out, 'ckpt.pt'), '--diag-images', '12', '--sample-batch', '8',
              '--top-k', '8', '--sf-top-k', '8', '--quiet'])
    res = json.load(open(os.path.join(out, 'diagnose.json')))
    assert res['images'] == 12 and set(res['per_scale']) == {'teacher', 'ssr', 'rollout'}
    # the coarsest scale's input is the class token whatever the inputs are
    first = {k: res['per_scale'][k]['1']['ce'] for k in res['per_scale']}
    assert first['teacher'] == pytest.approx(first['rollout'], abs=1e-3) == pytest.approx(first['ssr'], abs=1e-3)
    assert 'rollout' in capsys.readouterr().out


def test_smoke_pipeline_train_sh(tmp_path):
    """SMOKE=1 bash train.sh: every stage of the recipe with tiny sizes, ending in the TF vs SAR table."""
    env = dict(os.environ, SMOKE='1', OUT=str(tmp_path / 'smoke'))
    r = subprocess.run(['bash', 'train.sh'], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '| TF |' in r.stdout and '| SAR |' in r.stdout
    for f in ('samples_tf.npz', 'samples_sar.npz', 'eval_tf.json', 'eval_sar.json', 'sar/ckpt.pt'):
        assert os.path.isfile(tmp_path / 'smoke' / f), f


# =========================================================================================================
# tokenizer.py: fixture equivalence with the official FlexVAE code, quantization, data readers,
# checkpoint I/O, CLI and a short training smoke test
# =========================================================================================================

import io
import torch.nn.functional as F
from PIL import Image

import tokenizer as T

MNIST = os.environ.get('MNIST', os.path.join(HERE, 'data', 'mnist'))   # the MNIST IDX folder, optional


@pytest.fixture(scope='module')
def fx_vae(fx):
    c = fx['vae_config']
    vae = T.VQVAE(codebook_size=c['codebook_size'], codebook_dim=c['codebook_embed_dim'], z_channels=c['z_channels'],
                  ch=c['base_ch'], ch_mult=c['encoder_ch_mult'], num_res_blocks=c['num_res_blocks'])
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
        x = fx_vae.tf_input(fx['gt_idx_per_scale'], fx['scales'])
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
    cfg = dict(codebook_size=c['codebook_size'], codebook_dim=c['codebook_embed_dim'], z_channels=c['z_channels'],
               ch=c['base_ch'], ch_mult=tuple(c['encoder_ch_mult']), num_res_blocks=c['num_res_blocks'])
    T.save_atomic({'config': cfg, 'model': fx['vae_state_dict'], 'scales': [1, 2, 3, 5, 8], 'image_size': 128},
                  tmp_path / 'tok.pt')
    vae = T.load_tokenizer(tmp_path / 'tok.pt')
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.scales == [1, 2, 3, 5, 8] and vae.image_size == 128
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_conti(fx['images']), fx['vae_h_conti'], atol=1e-4, rtol=0)
    # the official layout {'model': sd} without a config means the real FlexVAE: the tiny weights must not fit,
    # and the error names the offending keys
    T.save_atomic({'model': fx['vae_state_dict']}, tmp_path / 'official.pt')
    with pytest.raises(ValueError) as e:
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
    assert nin == ['decoder.conv_blocks.1.res.0.nin_shortcut.weight', 'decoder.conv_blocks.3.res.0.nin_shortcut.weight',
                   'encoder.conv_blocks.2.res.0.nin_shortcut.weight', 'encoder.conv_blocks.4.res.0.nin_shortcut.weight']
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
    tf = vae.tf_input(idx, scales)
    assert tf.shape == (2, 4 + 9 + 64, 8)
    # bicubic upsampling of a 1x1 map is constant: the first 4 inputs all equal the scale-1 code
    torch.testing.assert_close(tf[:, :4], vae.codebook()[idx[0]].expand(2, 4, 8))
    up = F.interpolate(vae.embed(idx[2], 3), size=(8, 8), mode='bicubic', align_corners=False)
    torch.testing.assert_close(tf[:, 13:], up.flatten(2).transpose(1, 2))
    with torch.no_grad():
        assert vae.decode_code(idx[1], 2).shape == (2, 3, 4, 4)
        assert vae.decode_code(idx[-1], 8).shape == (2, 3, 16, 16)


def test_load_tokenizer_mismatch_lists_keys(tmp_path):
    vae = small_tok()
    sd = vae.state_dict()
    sd['extra.weight'] = torch.zeros(1)
    del sd['post_quant_conv.bias']
    T.save_atomic({'config': vae.config, 'model': sd}, tmp_path / 'x.pt')
    with pytest.raises(ValueError) as e:
        T.load_tokenizer(tmp_path / 'x.pt')
    assert 'extra.weight' in str(e.value) and 'post_quant_conv.bias' in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        T.load_tokenizer(tmp_path / 'nope.pt')
    assert 'nope.pt' in str(e.value)


# ----------------------------------------------------------------------------- checkpoint I/O

def test_save_atomic_and_load_checkpoint(tmp_path):
    p = tmp_path / 'sub' / 'ck.pt'
    T.save_atomic({'step': 3, 'w': torch.arange(4)}, p)
    assert os.listdir(p.parent) == ['ck.pt']  # no temporary file left behind
    ck = T.load_checkpoint(p)
    assert ck['step'] == 3 and torch.equal(ck['w'], torch.arange(4))
    # a failing write keeps the previous file intact and removes the temporary file
    with pytest.raises(Exception):
        T.save_atomic({'f': lambda: 0}, p)  # lambdas cannot be pickled
    assert os.listdir(p.parent) == ['ck.pt'] and T.load_checkpoint(p)['step'] == 3
    # objects outside the weights_only allow-list need the trust flag
    import argparse
    T.save_atomic({'args': argparse.Namespace(a=1)}, p)
    with pytest.raises(RuntimeError, match='trust'):
        T.load_checkpoint(p)
    assert T.load_checkpoint(p, trust=True)['args'].a == 1
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        T.load_checkpoint(tmp_path / 'missing.pt')


def test_save_image_grid(tmp_path):
    imgs = torch.full((5, 3, 4, 6), -1.0)
    imgs[1] = 1.0
    T.save_image_grid(imgs, tmp_path / 'g.png', nrow=3)
    a = np.asarray(Image.open(tmp_path / 'g.png'))
    assert a.shape == (2 + 2 * (4 + 2), 2 + 3 * (6 + 2), 3)  # 2 rows x 3 columns with 2 px gaps
    assert (a[2:6, 2:8] == 0).all() and (a[2:6, 10:16] == 255).all()
    assert not os.path.exists(str(tmp_path / 'g.png') + '.tmp')


# ----------------------------------------------------------------------------- data

def test_toy_dataset_deterministic_and_class_dependent():
    a = T.load_dataset('toy', 32, 'train', seed=0)
    b = T.load_dataset('toy', 32, 'train', seed=0)
    c = T.load_dataset('toy', 32, 'train', seed=1)
    v = T.load_dataset('toy', 32, 'val', seed=0)
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
    all_ = T.load_dataset('toy', 16, 'all')
    assert len(all_) == len(a) + len(v) and all_[len(a)][0].shape == (3, 16, 16)


def make_folder(root):
    """Class folders 'cat' and 'ant' with good images in several modes and four bad files."""
    os.makedirs(root / 'cat')
    os.makedirs(root / 'ant' / 'nested')
    good = {}
    Image.new('RGB', (40, 30), (200, 10, 10)).save(root / 'cat' / 'red.png'); good['red'] = (200, 10, 10)
    Image.new('RGB', (32, 32), (10, 200, 10)).save(root / 'cat' / 'green.jpg', quality=95); good['green'] = (10, 200, 10)
    Image.new('L', (32, 32), 100).save(root / 'ant' / 'gray.png'); good['gray'] = (100, 100, 100)
    Image.new('CMYK', (32, 32), (0, 255, 255, 0)).save(root / 'ant' / 'cmyk.jpg', quality=95); good['cmyk'] = (255, 0, 0)
    Image.new('RGBA', (32, 32), (10, 20, 230, 128)).save(root / 'ant' / 'nested' / 'rgba.png'); good['rgba'] = (10, 20, 230)
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
    ds = T.load_dataset(str(tmp_path), 16, 'all')
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
    tr = T.load_dataset(str(tmp_path / 'flat'), 8, 'train')
    va = T.load_dataset(str(tmp_path / 'flat'), 8, 'val')
    assert len(tr) + len(va) == 40 and len(va) == 2 and sorted(va.labels) == [0, 1]  # 5%, stratified
    assert not set(tr.files) & set(va.files)
    assert va.files == T.load_dataset(str(tmp_path / 'flat'), 8, 'val').files  # deterministic
    for s in ('train', 'val'):
        os.makedirs(tmp_path / 'tv' / s / 'k')
        Image.new('RGB', (8, 8)).save(tmp_path / 'tv' / s / 'k' / f'{s}.png')
    assert T.load_dataset(str(tmp_path / 'tv'), 8, 'val').files[0].endswith('val.png')
    assert len(T.load_dataset(str(tmp_path / 'tv'), 8, 'all')) == 2


def test_missing_or_empty_dataset_names_path(tmp_path):
    for bad in (tmp_path / 'nope', tmp_path / 'empty', tmp_path / 'noimg'):
        if bad.name != 'nope':
            os.makedirs(bad / 'cls')
        if bad.name == 'noimg':
            (bad / 'cls' / 'a.txt').write_text('x')
        with pytest.raises(T.DataError) as e:
            T.load_dataset(str(bad), 32)
        assert str(bad) in str(e.value)
    (tmp_path / 'x.npz').write_bytes(b'junk')
    with pytest.raises(T.DataError, match='x.npz'):
        T.load_dataset(str(tmp_path / 'x.npz'), 32)


def test_npz_reader_nhw_and_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    nhw = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 4
    np.savez(tmp_path / 'g.npz', images=nhw, labels=labels)
    ds = T.load_dataset(str(tmp_path / 'g.npz'), 28, 'all')
    x, y = ds[7]
    assert x.shape == (3, 28, 28) and y == 3 and ds.num_classes == 4
    torch.testing.assert_close(x[1], torch.from_numpy(nhw[7]).float() / 127.5 - 1)  # grey copied to all channels
    nhwc = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / 'c.npz', images=nhwc, labels=labels)
    ds = T.load_dataset(str(tmp_path / 'c.npz'), 16, 'all')
    torch.testing.assert_close(ds[5][0], torch.from_numpy(nhwc[5]).permute(2, 0, 1).float() / 127.5 - 1)
    assert T.load_dataset(str(tmp_path / 'c.npz'), 8, 'all')[0][0].shape == (3, 8, 8)  # resized
    tr, va = (T.load_dataset(str(tmp_path / 'c.npz'), 16, s) for s in ('train', 'val'))
    assert len(tr) + len(va) == 40 and len(va) == 2
    np.savez(tmp_path / 'f.npz', images=nhwc.astype(np.float32))
    with pytest.raises(T.DataError, match='uint8'):
        T.load_dataset(str(tmp_path / 'f.npz'), 16)


@pytest.mark.skipif(not os.path.isdir(MNIST), reason='MNIST not found: set MNIST=<folder with the IDX files>')
def test_mnist_reader_split_and_padding():
    tr = T.load_dataset(MNIST, 32, 'train')
    va = T.load_dataset(MNIST, 32, 'val')
    assert (len(tr), len(va)) == (8000, 2000) and tr.num_classes == 10
    # stratified: each class has 20% of its test-split images in val (counts from the MNIST README)
    counts = np.array([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert np.abs(np.bincount(va.labels, minlength=10) - 0.2 * counts).max() <= 1
    x, y = va[0]
    assert x.shape == (3, 32, 32) and 0 <= y <= 9
    assert (x[:, :2, :] == -1).all() and (x[:, :, -2:] == -1).all()  # padded with black, not resized
    assert torch.equal(x[0], x[2]) and x.max() > 0.9
    assert T.load_dataset(MNIST, 64, 'val')[0][0].shape == (3, 64, 64)


# ----------------------------------------------------------------------------- CLI and training

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, 'tokenizer.py'), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=120, env=dict(os.environ, TQDM_DISABLE='1'))


def test_help_documents_every_flag():
    parser = T.get_parser()
    opts = [a for a in parser._actions if a.option_strings and a.dest != 'help']
    assert {'--data', '--image-size', '--out', '--steps', '--batch-size', '--lr', '--codebook-size', '--codebook-dim',
            '--ch', '--ch-mult', '--z-channels', '--num-res-blocks', '--scales', '--ckpt-every', '--resume', '--seed',
            '--device', '--workers', '--eval-only'} <= {s for a in opts for s in a.option_strings}
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


def test_train_smoke_checkpoint_and_resume(tmp_path, capsys):
    out = str(tmp_path / 'tok.pt')
    T.main(TINY + ['--steps', '3', '--out', out])
    ck = T.load_checkpoint(out)
    assert ck['step'] == 3 and ck['scales'] == [1, 2, 4, 8] and ck['image_size'] == 16
    assert ck['config']['codebook_size'] == 16 and not os.path.exists(out + '.tmp')
    printed = capsys.readouterr().out
    assert 'PSNR' in printed and all(f'  {pn}  ' in printed for pn in (1, 2, 4, 8))
    assert os.path.exists(str(tmp_path / 'tok_recon.png'))
    w3 = ck['model']['decoder.conv_out.weight']
    T.main(TINY + ['--steps', '5', '--out', out, '--resume'])
    assert 'resumed' in capsys.readouterr().out
    ck = T.load_checkpoint(out)
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
