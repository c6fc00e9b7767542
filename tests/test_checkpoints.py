"""`littune download` / `convert` / `models`, end to end: the real CLI against a local Hub (tests/hub_server.py).

Tiny random-init models of real architectures are written with transformers' `save_pretrained` and served by a
stdlib HTTP server that speaks the part of the Hub API huggingface_hub uses. `littune download` runs in a subprocess
with HF_ENDPOINT pointing at it (huggingface_hub reads HF_ENDPOINT at import) and its own HF_HOME. The CLI runs are
independent, so the module starts them all at once on a small thread pool and each test waits for the ones it reads;
the whole file stays well under a minute and a half on two cores.
"""

import json
import os
import shlex
import shutil
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import (copy_tokenizer, free_port, listing, lit_logits, make_hf_checkpoint, one_error_line,
                      run_cli, run_main)
from hub_server import HubServer, repo_of
from littune.cli import main

TOKEN = "abc123secret"  # opens org/private-ok, passed as --access_token
GATED_TOKEN = "hf_gatedTokenXyz789"  # opens org/gated-ok, passed as HF_TOKEN
SENTENCE = "Hello world, this is a test of the tokenizer: 1234 ünïcödé and\nnew lines."
WEIGHT_SUFFIXES = (".safetensors", ".bin")
WORKERS = 3  # CLI runs are mostly import time; three keep both cores busy while one waits on I/O


# --------------------------------------------------------------------------------------------- the local Hub


def write_unsupported(folder: Path) -> Path:
    """A GPT-2 repo: real config.json keys, a weights file, a tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
              "vocab_size": 50304, "n_positions": 256}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"transformer.wte.weight": torch.zeros(8, 4)}, folder / "model.safetensors")
    copy_tokenizer("pythia", folder)
    return folder


class RunsCommand:
    """Unpickling this object runs `touch MARKER`: the classic malicious pytorch_model.bin (its __reduce__ names
    os.system). Any unpickler that resolves globals freely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_malicious_bin(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A pytorch_model.bin with a real-looking tensor and the payload (zip format, or torch's pre-1.6 format)."""
    state = {"gpt_neox.embed_in.weight": torch.zeros(4, 64), "payload": RunsCommand(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path




@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Source folders (what the Hub repos hold) and the transformers models they were saved from."""
    root = tmp_path_factory.mktemp("src")
    models = {
        "falcon": make_hf_checkpoint(root / "falcon", "falcon"),
        "gpt_neox": make_hf_checkpoint(root / "gpt_neox", "gpt_neox"),
        "llama": make_hf_checkpoint(root / "llama", "llama"),
        "bin": make_hf_checkpoint(root / "bin", "gpt_neox", seed=1, weights="bin"),
    }
    # safetensors and a *different* pytorch_model.bin (which of them was converted shows in the weights), plus the
    # training_args.bin a Trainer leaves in a repo
    both = root / "both"
    shutil.copytree(root / "gpt_neox", both)
    torch.save({k: v + 1 for k, v in models["gpt_neox"].state_dict().items()}, both / "pytorch_model.bin")
    torch.save({"learning_rate": 1e-4}, both / "training_args.bin")
    # sharded with an index, plus the `consolidated.safetensors` some repos also carry (the same weights again)
    sharded = root / "sharded"
    models["gpt_neox"].save_pretrained(sharded, max_shard_size="8MB")
    copy_tokenizer("pythia", sharded)
    shutil.copyfile(root / "gpt_neox" / "model.safetensors", sharded / "consolidated.safetensors")
    # a .bin-only repo whose pytorch_model.bin runs a command when unpickled
    shutil.copytree(root / "bin", root / "evil_bin")
    write_malicious_bin(root / "evil_bin" / "pytorch_model.bin", root / "evil_bin.marker")
    # a hostile mirror's repo: its index names a shard two folders up, and the listing holds that name
    climbing = root / "climbing"
    shutil.copytree(root / "gpt_neox", climbing, ignore=shutil.ignore_patterns("*.safetensors"))
    (climbing / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../escape.safetensors" for k in models["gpt_neox"].state_dict()}}))
    no_weights = root / "no_weights"
    shutil.copytree(root / "falcon", no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    write_unsupported(root / "gpt2")
    return {"root": root, "models": models}


@pytest.fixture(scope="module")
def hub(sources):
    root = sources["root"]
    with HubServer() as server:
        for repo, folder in [
            ("org/tiny-falcon", "falcon"), ("org/tiny-neox", "gpt_neox"), ("org/tiny-llama", "llama"),
            ("org/tiny-bin", "bin"), ("org/tiny-both", "both"), ("org/tiny-resume", "gpt_neox"),
            ("org/tiny-tok", "llama"), ("org/tiny-sharded", "sharded"), ("org/no-weights", "no_weights"), ("org/tiny-gpt2", "gpt2"),
            ("org/evil-bin", "evil_bin"),
        ]:
            server.add_folder(repo, root / folder)
        climbing = {p.name: p.read_bytes() for p in (root / "climbing").iterdir()}
        climbing["../../escape.safetensors"] = (root / "gpt_neox" / "model.safetensors").read_bytes()
        server.add_files("org/climbing-index", climbing)
        server.add_folder("org/private", root / "falcon", access="private", token=TOKEN)
        server.add_folder("org/private-ok", root / "falcon", access="private", token=TOKEN)
        server.add_folder("org/gated", root / "falcon", access="gated", token=GATED_TOKEN)
        server.add_folder("org/gated-ok", root / "falcon", access="gated", token=GATED_TOKEN)
        yield server


class Run:
    """One `littune download` subprocess with its own checkpoints/ root and HF_HOME."""

    def __init__(self, hub: HubServer, folder: Path, *args: str, endpoint: str | None = None, **env: str):
        self.hub, self.folder, self.args = hub, folder, args
        self.checkpoints, self.hf_home = folder / "checkpoints", folder / "hf_home"
        self.env = {"HF_ENDPOINT": endpoint or hub.url, "HF_HOME": str(self.hf_home), "OMP_NUM_THREADS": "1",
                    "HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60", **env}  # a loaded CI box is slow

    def __call__(self, *extra: str, **env: str):
        repo = self.args[self.args.index("--repo_id") + 1]
        before = len(self.hub.requests_for(repo))
        result = run_cli("download", *self.args, *extra, "--checkpoint_dir", str(self.checkpoints),
                         env={**self.env, **env}, timeout=300)
        result.requests = self.hub.requests_for(repo)[before:]
        result.gets = [r.path.rsplit("/", 1)[-1] for r in result.requests if r.method == "GET" and "/resolve/" in r.path]
        return result


@pytest.fixture(scope="module", autouse=True)
def runs(hub, tmp_path_factory):
    """Every download scenario, started at once (before the first test, which works in-process meanwhile);
    `runs[name].result()` waits for one."""
    mp = pytest.MonkeyPatch()
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        mp.delenv(var, raising=False)
    base = tmp_path_factory.mktemp("runs")

    def new(name, repo, *args, **kwargs) -> Run:
        return Run(hub, base / name, "--repo_id", repo, *args, **kwargs)

    def falcon_chain():  # download, again (skips), again offline (no Hub at all)
        run = new("falcon", "org/tiny-falcon")
        first = run()
        mtime = (run.checkpoints / "org/tiny-falcon/lit_model.pth").stat().st_mtime_ns
        return types.SimpleNamespace(run=run, first=first, mtime=mtime, again=run(), offline=run(HF_HUB_OFFLINE="1"))

    def resume_chain():  # the connection drops 3 MB into the weights, then the same command again
        hub.drop_after[("org/tiny-resume", "model.safetensors")] = 15_000_000  # past the first 10 MB chunk
        run = new("resume", "org/tiny-resume", "--convert", "false")  # the download is what is tested here
        first = run()
        partial = sorted((run.checkpoints / "org/tiny-resume/.cache/huggingface/download").glob("*.incomplete"))
        sizes = [p.stat().st_size for p in partial]
        return types.SimpleNamespace(run=run, first=first, partial_sizes=sizes, second=run())

    def single(name, repo, *args, **kwargs):
        run = new(name, repo, *args, **kwargs)
        return lambda: types.SimpleNamespace(run=run, result=run())

    jobs = {  # the longest first
        "falcon": falcon_chain,
        "resume": resume_chain,
        "neox": single("neox", "org/tiny-neox"),
        "llama": single("llama", "org/tiny-llama"),
        "access_token": single("access_token", "org/private-ok", "--access_token", TOKEN),
        "unsupported": single("unsupported", "org/tiny-gpt2"),
        # download only; these are converted in the test process, where litgpt is already imported
        "bin": single("bin", "org/tiny-bin", "--convert", "false"),
        "both": single("both", "org/tiny-both", "--convert", "false"),
        "sharded": single("sharded", "org/tiny-sharded", "--convert", "false"),
        "hf_token": single("hf_token", "org/gated-ok", "--convert", "false", HF_TOKEN=GATED_TOKEN),
        "tokenizer_only": single("tokenizer_only", "org/tiny-tok", "--tokenizer_only", "true"),
        "evil_bin": single("evil_bin", "org/evil-bin"),
        "climbing_index": single("climbing_index", "org/climbing-index", "--convert", "false"),
        "not_found": single("not_found", "org/does-not-exist"),
        "gated": single("gated", "org/gated"),
        "private": single("private", "org/private"),
        "no_weights": single("no_weights", "org/no-weights"),
        "unreachable": single("unreachable", "org/tiny-falcon", endpoint=f"http://127.0.0.1:{free_port()}"),
        "offline_missing": single("offline_missing", "org/tiny-falcon", HF_HUB_OFFLINE="1"),
    }
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    mp.undo()


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result




# ----------------------------------------------------------------------------------------------------- helpers




def assert_parity(folder: Path, hf_model, tol: float = 1e-4) -> None:
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = hf_model(ids).logits
    got = lit_logits(folder, ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= tol, f"{folder.name}: max |logits diff| {diff:.2e} > {tol}"


def assert_no_weight_files_fetched(gets: list[str]) -> None:
    assert not [g for g in gets if g.endswith(WEIGHT_SUFFIXES)], gets






def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes()]


# ------------------------------------------------------- in-process tests first: they run while the downloads do


def test_convert_mistral_locally(tmp_path):
    folder = tmp_path / "tiny-mistral"
    model = make_hf_checkpoint(folder, "mistral")
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    assert_parity(folder, model)


def test_models_and_repo_id_list(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "tiiuae/falcon-7b" in listed and "EleutherAI/pythia-160m" in listed
    assert main(["download", "--repo_id", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == listed


@pytest.mark.parametrize("flags, fragment", [
    (["--repo_id", "org/.."], "expected ORG/NAME"),
    (["--repo_id", "../x"], "expected ORG/NAME"),
    (["--repo_id", "org/x", "--gguf_file", "../../m.gguf"], "--gguf_file"),
    (["--repo_id", "org/x", "--gguf_file", "/tmp/m.gguf"], "--gguf_file"),
])
def test_download_names_that_climb_out_are_refused_first(tmp_path, capsys, monkeypatch, flags, fragment):
    """ORG/NAME and --gguf_file become paths under --checkpoint_dir: `..` is refused before the Hub is asked."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # never the real Hub
    result = run_main(capsys, "download", *flags, "--checkpoint_dir", str(tmp_path / "c" / "d"),
                      "--access_token", "unused")
    one_error_line(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_convert_folder_without_weights(sources, tmp_path, capsys):
    folder = tmp_path / "no-weights"
    shutil.copytree(sources["root"] / "no_weights", folder)
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "no weight files", str(folder))
    assert listing(folder) == before


def test_convert_missing_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(missing)), "no such folder")
    assert not missing.exists()


def test_convert_unsupported_architecture(sources, tmp_path, capsys):
    folder = tmp_path / "tiny-gpt2"
    shutil.copytree(sources["root"] / "gpt2", folder)
    before = listing(folder)
    result = run_main(capsys, "convert", "--checkpoint_dir", str(folder))
    one_error_line(result, "GPT2LMHeadModel", "GPTNeoXForCausalLM", "FalconForCausalLM", "LlamaForCausalLM")
    assert listing(folder) == before


def test_convert_truncated_weights(sources, tmp_path, capsys):
    """A weights file cut short (a copy interrupted outside littune): one clear line, nothing written."""
    folder = tmp_path / "tiny-neox-cut"
    shutil.copytree(sources["root"] / "gpt_neox", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "truncated", "model.safetensors")
    assert listing(folder) == before


def rewrite_safetensors_header(path: Path, change) -> None:
    """Rewrite a .safetensors file's JSON header in place with `change(header)`; the data bytes stay as they are."""
    import struct

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])


EMBED = "gpt_neox.embed_in.weight"


def _overlap(header):  # the second tensor's bytes start inside the first's
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 4, end - 4]


BAD_HEADERS = {  # name -> (change, words the error line must hold besides the file name)
    "empty_span": (lambda h: h[EMBED].update(data_offsets=[0, 0]), [EMBED, "bytes"]),
    "short_span": (lambda h: h[EMBED].update(shape=[h[EMBED]["shape"][0], 128]), [EMBED, "bytes"]),
    "negative_begin": (lambda h: h[EMBED].update(data_offsets=[-8, h[EMBED]["data_offsets"][1] - 8]), [EMBED]),
    "end_before_begin": (lambda h: h[EMBED].update(data_offsets=list(reversed(h[EMBED]["data_offsets"]))), [EMBED]),
    "unknown_dtype": (lambda h: h[EMBED].update(dtype="F4"), [EMBED, "F4"]),
    "bad_shape": (lambda h: h[EMBED].update(shape=[-1, 64]), [EMBED, "shape"]),
    "not_an_entry": (lambda h: h.update({EMBED: [1, 2]}), [EMBED]),
    "overlap": (_overlap, ["overlap"]),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_convert_refuses_bad_safetensors_header(sources, tmp_path, capsys, case):
    """Offsets, sizes and dtypes of every header entry are checked before any tensor is read: an entry with
    data_offsets [0, 0] and a non-empty shape must not become uninitialised memory in lit_model.pth."""
    folder = tmp_path / "tiny-neox-header"
    shutil.copytree(sources["root"] / "gpt_neox", folder)
    change, words = BAD_HEADERS[case]
    rewrite_safetensors_header(folder / "model.safetensors", change)
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "model.safetensors", *words)
    assert listing(folder) == before


@pytest.mark.parametrize("index, shard", [
    ("model.safetensors.index.json", "../outside/model.safetensors"),
    ("model.safetensors.index.json", "ABSOLUTE"),
    ("pytorch_model.bin.index.json", "../outside/pytorch_model.bin"),
    ("pytorch_model.bin.index.json", "..\\outside\\pytorch_model.bin"),
    ("model.safetensors.index.json", "config.json"),
], ids=["parent", "absolute", "bin_parent", "backslashes", "not_weights"])
def test_convert_refuses_shard_names_outside_the_folder(sources, tmp_path, capsys, index, shard):
    """An index's shard names must be plain weight-file names in the folder: `..`, absolute paths, backslashes and
    files that are not weights are refused (before, the file outside was converted)."""
    outside = tmp_path / "outside"
    shutil.copytree(sources["root"] / "gpt_neox", outside)
    shutil.copyfile(sources["root"] / "bin" / "pytorch_model.bin", outside / "pytorch_model.bin")
    folder = tmp_path / "tiny-neox-index"
    shutil.copytree(sources["root"] / "gpt_neox", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    if shard == "ABSOLUTE":
        shard = str(outside / "model.safetensors")
    (folder / index).write_text(json.dumps({"weight_map": {"gpt_neox.embed_in.weight": shard}}))
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), index, repr(shard))
    assert listing(folder) == before


def test_convert_refuses_damaged_index(sources, tmp_path, capsys):
    folder = tmp_path / "tiny-neox-badindex"
    shutil.copytree(sources["root"] / "gpt_neox", folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "model.safetensors.index.json")
    assert listing(folder) == before


@pytest.mark.parametrize("change, words", [
    (lambda c: [c], "not the object"),
    (lambda c: {**c, "hidden_size": "64"}, "hidden_size='64'"),
    (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads=0"),
    (lambda c: {**c, "architectures": [["GPTNeoXForCausalLM"]], "model_type": ["gpt_neox"]}, "cannot convert"),
    (lambda c: {**c, "rope_scaling": "linear"}, "rope_scaling"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "wrong kind"),
], ids=["list", "string_size", "zero_heads", "unhashable_architecture", "scaling_not_object", "string_theta"])
def test_convert_refuses_config_of_the_wrong_kind(sources, tmp_path, capsys, change, words):
    """config.json comes from someone else's repo: values of the wrong kind are one line naming the key, not a
    TypeError, ZeroDivisionError or AttributeError traceback."""
    folder = tmp_path / "tiny-neox-config"
    shutil.copytree(sources["root"] / "gpt_neox", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "config.json", words)
    assert listing(folder) == before


def test_convert_unknown_tensor(sources, tmp_path, capsys):
    """A tensor litgpt's name map does not know (here a classification head): a clean error, not a KeyError."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tiny-neox-head"
    shutil.copytree(sources["root"] / "gpt_neox", folder)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "score.weight": torch.zeros(2, 64)}, folder / "model.safetensors")
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "score.weight")
    assert listing(folder) == before


def test_convert_mismatch_leaves_no_partial_output(sources, tmp_path, capsys):
    """config.json says 3 layers, the weights have 2: found after streaming, and nothing is left behind."""
    folder = tmp_path / "tiny-neox-3"
    shutil.copytree(sources["root"] / "gpt_neox", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "do not match", "missing")
    assert listing(folder) == before  # no lit_model.pth, model_config.yaml or temporary file


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_refuses_pickle_that_runs_code(sources, tmp_path, capsys, legacy):
    """A pytorch_model.bin whose unpickling would run a command: refused by name, the command never runs."""
    folder = tmp_path / "tiny-evil"
    shutil.copytree(sources["root"] / "bin", folder)
    marker = tmp_path / "pwned"
    write_malicious_bin(folder / "pytorch_model.bin", marker, legacy=legacy)
    before = listing(folder)
    line = one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "pytorch_model.bin")
    assert str(folder / "pytorch_model.bin") in line and "posix.system" in line
    assert not marker.exists()
    assert listing(folder) == before


def test_convert_with_litgpt_refuses_pickle_that_runs_code(tmp_path, capsys):
    """A litgpt named config of a family littune hands to litgpt's own conversion (phi), which reads .bin files
    with its lazy_load: that path must not unpickle freely either."""
    folder = tmp_path / "phi-1_5"
    folder.mkdir()
    marker = tmp_path / "pwned"
    write_malicious_bin(folder / "pytorch_model.bin", marker)
    before = listing(folder)
    line = one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "pytorch_model.bin")
    assert "posix.system" in line
    assert not marker.exists()
    assert listing(folder) == before  # litgpt's model_config.yaml removed again


def test_convert_legacy_format_bin(sources, tmp_path):
    """A .bin in torch's pre-1.6 format (no zip, so no mmap) is still read, with weights_only."""
    folder = tmp_path / "tiny-legacy"
    shutil.copytree(sources["root"] / "bin", folder)
    model = sources["models"]["bin"]
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    assert_parity(folder, model)


# --------------------------------------------------------------------------------------- download, then convert


@pytest.mark.parametrize("name, repo, arch", [
    ("falcon", "org/tiny-falcon", "falcon"),
    ("neox", "org/tiny-neox", "gpt_neox"),
    ("llama", "org/tiny-llama", "llama"),
])
def test_download_converts_with_logits_parity(runs, sources, name, repo, arch):
    job = runs[name].result()
    result = ok(job.first if name == "falcon" else job.result)
    folder = job.run.checkpoints / repo
    assert {"config.json", "model.safetensors", "lit_model.pth", "model_config.yaml"} <= set(os.listdir(folder))
    assert "model.safetensors" in result.gets
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    assert_parity(folder, sources["models"][arch])


@pytest.mark.parametrize("name, repo, bos", [
    ("falcon", "org/tiny-falcon", False),
    ("neox", "org/tiny-neox", False),
    ("llama", "org/tiny-llama", True),
])
def test_tokenizer_matches_transformers(runs, name, repo, bos):
    """litgpt's Tokenizer on the downloaded folder gives transformers' ids.

    BOS: litgpt adds it only when tokenizer_config.json says so (`add_bos_token`, or `tokenizer_class`
    LlamaTokenizer); a Llama repo that ships just tokenizer.model (like this one) gets none by default, while
    transformers adds `<s>` by default. So: litgpt's default == transformers without special tokens, and litgpt
    with bos=True == transformers' default. Falcon and Pythia add no BOS either way.
    (transformers 5 converts tokenizer.model to a `tokenizers` tokenizer, which needs protobuf, and differs from
    SentencePiece itself on runs of spaces and on a leading space; the sentence has neither.)
    """
    import transformers
    from litgpt import Tokenizer

    job = runs[name].result()
    folder = job.run.checkpoints / repo
    ours = Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.encode(SENTENCE).tolist() == theirs(SENTENCE, add_special_tokens=False)["input_ids"]
    assert ours.encode(SENTENCE, bos=bos).tolist() == theirs(SENTENCE)["input_ids"]
    if bos:
        assert theirs(SENTENCE)["input_ids"][0] == ours.bos_id == 1


def test_bin_only_repo_converts_with_parity(runs, sources):
    job = runs["bin"].result()
    ok(job.result)
    folder = job.run.checkpoints / "org/tiny-bin"
    assert "pytorch_model.bin" in job.result.gets and not (folder / "lit_model.pth").exists()  # --convert false
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    assert_parity(folder, sources["models"]["bin"])


def test_download_refuses_pickle_that_runs_code(runs, sources):
    """`littune download` of a repo with only a .bin converts it: the payload must not run there either."""
    job = runs["evil_bin"].result()
    one_error_line(job.result, "pytorch_model.bin", "posix.system")
    assert not (sources["root"] / "evil_bin.marker").exists()
    assert not (job.run.checkpoints / "org/evil-bin/lit_model.pth").exists()


def test_download_refuses_shard_names_that_climb_out(runs):
    """A weight index from a hostile mirror naming `../../escape.safetensors` (and a listing and a server that
    serve it): refused before anything is fetched, nothing written outside (or inside) the checkpoint folder."""
    job = runs["climbing_index"].result()
    line = one_error_line(job.result, "model.safetensors.index.json", "../../escape.safetensors")
    assert "org/climbing-index" in line
    assert list(job.run.folder.rglob("escape*")) == []
    assert_no_weight_files_fetched(job.result.gets)


def test_sharded_repo_fetches_indexed_shards_only(runs, sources):
    job = runs["sharded"].result()
    ok(job.result)
    folder = job.run.checkpoints / "org/tiny-sharded"
    shards = sorted(p.name for p in (sources["root"] / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert sorted(g for g in job.result.gets if g.startswith("model-")) == shards
    assert "model.safetensors.index.json" in job.result.gets and "consolidated.safetensors" not in job.result.gets
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    assert_parity(folder, sources["models"]["gpt_neox"])


@pytest.fixture(scope="module")
def both_bf16(runs):
    """org/tiny-both downloaded (safetensors + a different pytorch_model.bin + training_args.bin), converted bf16."""
    job = runs["both"].result()
    ok(job.result)
    folder = job.run.checkpoints / "org/tiny-both"
    files = set(os.listdir(folder))
    assert main(["convert", "--checkpoint_dir", str(folder), "--dtype", "bfloat16"]) == 0
    return types.SimpleNamespace(job=job, folder=folder, files=files,
                                 state=torch.load(folder / "lit_model.pth", weights_only=True))


def test_safetensors_preferred_and_training_args_skipped(both_bf16, sources):
    gets = both_bf16.job.result.gets
    assert "model.safetensors" in gets
    assert "pytorch_model.bin" not in gets and "training_args.bin" not in gets
    assert "model.safetensors" in both_bf16.files
    assert "pytorch_model.bin" not in both_bf16.files and "training_args.bin" not in both_bf16.files
    # the .bin holds the weights + 1: the converted embedding is the safetensors one
    expected = sources["models"]["gpt_neox"].gpt_neox.embed_in.weight.detach().to(torch.bfloat16)
    assert torch.equal(both_bf16.state["transformer.wte.weight"], expected)


def test_dtype_bfloat16(both_bf16):
    assert both_bf16.state and {v.dtype for v in both_bf16.state.values()} == {torch.bfloat16}
    from safetensors import safe_open

    with safe_open(str(both_bf16.folder / "model.safetensors"), "pt") as f:  # the HF file is left as it was
        assert f.get_tensor("gpt_neox.embed_in.weight").dtype == torch.float32


def test_rerun_skips_downloaded_files_and_conversion(runs):
    job = runs["falcon"].result()
    again = ok(job.again)
    assert "model.safetensors" in job.first.gets
    assert again.gets == [], again.gets  # every file is there at the same commit: no file request at all
    assert "skipping conversion" in again.stderr
    assert (job.run.checkpoints / "org/tiny-falcon/lit_model.pth").stat().st_mtime_ns == job.mtime


def test_offline_mode_uses_downloaded_files(runs):
    job = runs["falcon"].result()
    offline = ok(job.offline)
    assert offline.requests == []
    assert "HF_HUB_OFFLINE" in offline.stderr


def test_interrupted_download_resumes_with_range(runs, sources):
    job = runs["resume"].result()
    one_error_line(job.first, "interrupted", "re-run")
    full = (sources["root"] / "gpt_neox/model.safetensors").read_bytes()
    assert len(job.partial_sizes) == 1 and 0 < job.partial_sizes[0] < len(full)
    second = ok(job.second)
    weight_gets = [r for r in second.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(weight_gets) == 1 and weight_gets[0].headers.get("Range") == f"bytes={job.partial_sizes[0]}-"
    folder = job.run.checkpoints / "org/tiny-resume"
    assert (folder / "model.safetensors").read_bytes() == full
    assert not list((folder / ".cache/huggingface/download").glob("*.incomplete"))


def test_tokenizer_only_fetches_no_weights(runs):
    job = runs["tokenizer_only"].result()
    ok(job.result)
    folder = job.run.checkpoints / "org/tiny-tok"
    assert "tokenizer.model" in job.result.gets and "config.json" in job.result.gets
    assert_no_weight_files_fetched(job.result.gets)
    assert not list(folder.glob("*.safetensors")) and not (folder / "lit_model.pth").exists()


@pytest.mark.parametrize("name, repo, token", [
    ("access_token", "org/private-ok", TOKEN),
    ("hf_token", "org/gated-ok", GATED_TOKEN),
])
def test_token_is_sent_and_never_written(runs, name, repo, token):
    job = runs[name].result()
    result = ok(job.result)
    assert (job.run.checkpoints / repo / "model.safetensors").is_file()
    assert result.requests and all(r.headers.get("Authorization") == f"Bearer {token}" for r in result.requests)
    assert files_containing(job.run.folder, token) == []  # its checkpoints/ and HF_HOME
    assert token not in result.stdout + result.stderr


@pytest.mark.parametrize("name, repo, fragments", [
    ("not_found", "org/does-not-exist", ["not found"]),
    ("gated", "org/gated", ["gated", "--access_token", "HF_TOKEN"]),
    ("private", "org/private", ["401", "--access_token"]),
    ("unreachable", "org/tiny-falcon", ["cannot reach", "HF_ENDPOINT", "HF_HUB_OFFLINE"]),
    ("no_weights", "org/no-weights", ["no weight files"]),
    ("unsupported", "org/tiny-gpt2", ["GPT2LMHeadModel", "GPTNeoXForCausalLM", "FalconForCausalLM", "LlamaForCausalLM"]),
    ("offline_missing", "org/tiny-falcon", ["HF_HUB_OFFLINE"]),
])
def test_download_errors_are_clean_and_leave_nothing(runs, name, repo, fragments):
    job = runs[name].result()
    line = one_error_line(job.result, *fragments)
    assert repo in line
    assert not (job.run.checkpoints / repo).exists()  # no ORG/NAME folder for a repo that failed
    assert_no_weight_files_fetched(job.result.gets)  # in particular: not the unsupported repo's weights


def test_token_only_sent_where_given(runs, hub):
    """Every request for a repo given a token carried exactly that token; no request for any other repo (those that
    need one and got none included) carried an Authorization header at all."""
    for future in runs.values():
        future.result()
    given = {"org/private-ok": TOKEN, "org/gated-ok": GATED_TOKEN}
    for repo, token in given.items():
        sent = [r.headers.get("Authorization") for r in hub.requests_for(repo)]
        assert sent and set(sent) == {f"Bearer {token}"}, (repo, sent)
    others = [r for r in list(hub.requests) if repo_of(r.path) not in given]
    assert {"org/private", "org/gated", "org/tiny-falcon", "org/tiny-neox"} <= {repo_of(r.path) for r in others}
    assert [(r.path, r.headers["Authorization"]) for r in others if "Authorization" in r.headers] == []
