"""benchmarks/vs_llamacpp.py without llama.cpp: the GGUF Q8_0 file holds the same weights as our checkpoint (read
back through the `gguf` package's reader), and our side's measurement runs on a tiny model. Never builds llama.cpp.
"""

from __future__ import annotations

import dataclasses
import math
import os

import gguf
import pytest
import torch

from benchmarks import engine, vs_llamacpp
from int8serve.engine import model_cache
from int8serve.engine.kernels import activation, attention, cpu_flags
from int8serve.engine.loader import load_model, unpermute_meta_rotary

TINY = dataclasses.replace(vs_llamacpp.LLAMA2_7B, dim=64, n_heads=4, n_kv_heads=4, hidden_dim=96, vocab_size=320,
                           n_layers=2, max_seq_len=1024)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> vs_llamacpp.WeightFiles:
    return vs_llamacpp.write_weights(TINY, tmp_path_factory.mktemp("weights"))


def dequantized(tensor) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(values.reshape([int(d) for d in reversed(tensor.shape)]).copy())


def ours_dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] times its scales ([N] per row or [N, G] per group of K / G inputs), in fp32."""
    n, k = q.shape
    groups = scale.reshape(n, -1)
    return (q.float().reshape(n, groups.shape[1], -1) * groups[..., None]).reshape(n, k)


def test_gguf_holds_our_weights(files: vs_llamacpp.WeightFiles) -> None:
    """The default weights have a scale per 32 inputs, as Q8_0 does: every block keeps its own."""
    reader = gguf.GGUFReader(files.gguf)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * TINY.n_layers + 1
    ours = load_model(files.checkpoint).model
    for index in range(TINY.n_layers):
        for name, theirs in vs_llamacpp.GGUF_LINEARS.items():
            tensor = tensors[f"blk.{index}.{theirs}.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            linear = ours.layers[index].get_submodule(name)
            assert [int(d) for d in tensor.shape] == [linear.in_features, linear.out_features]
            weight = dequantized(tensor)
            if name in ("attention.wq", "attention.wk"):
                weight = unpermute_meta_rotary(weight, TINY.n_heads)
            q, scale = linear.quantized()
            assert scale.shape == (linear.out_features, linear.in_features // 32)
            assert torch.equal(weight, ours_dequantized(q, scale))
        assert tensors[f"blk.{index}.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    output = dequantized(tensors["output.weight"])
    assert torch.equal(output, ours_dequantized(*ours.output.quantized()))
    embedding = dequantized(tensors["token_embd.weight"])
    assert torch.allclose(embedding, ours.tok_embeddings.weight, atol=0.05)
    assert files.q8_0_bytes == sum(int(t.n_bytes) for n, t in tensors.items() if n.startswith(("blk", "output."))
                                   and t.tensor_type == gguf.GGMLQuantizationType.Q8_0)


def test_gguf_metadata(files: vs_llamacpp.WeightFiles) -> None:
    reader = gguf.GGUFReader(files.gguf)

    def value(key: str):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == TINY.n_layers
    assert value("llama.rope.dimension_count") == TINY.head_dim
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == TINY.vocab_size and tokens[:3] == ["<unk>", "<s>", "</s>"] and "<0x0A>" in tokens


def test_weights_are_written_once(files: vs_llamacpp.WeightFiles) -> None:
    again = vs_llamacpp.write_weights(TINY, files.gguf.parent)
    assert again == files


@pytest.mark.parametrize("group_size", [0, 64])
def test_coarser_scales_repeat_over_their_q8_0_blocks(group_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (3, 128), generator=generator, dtype=torch.int8)
    scale = engine.random_scales(3, 128, generator, group_size).to(torch.bfloat16).float()
    raw = vs_llamacpp.q8_0_blocks(q, scale)
    back = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType.Q8_0).reshape(3, 128)
    assert torch.equal(torch.from_numpy(back.copy()), ours_dequantized(q, scale))


def test_scale_groups_must_split_the_blocks() -> None:
    with pytest.raises(ValueError, match="do not split"):
        vs_llamacpp.q8_0_blocks(torch.ones(1, 96, dtype=torch.int8), torch.ones(1, 2))


def test_q8_0_refuses_scales_fp16_cannot_hold() -> None:
    with pytest.raises(ValueError, match="fp16"):
        vs_llamacpp.q8_0_blocks(torch.ones(1, 32, dtype=torch.int8), torch.tensor([1.0 + 2**-12]))


def test_our_side_measures(files: vs_llamacpp.WeightFiles) -> None:
    with engine.torch_threads(1):  # a tiny model: one thread is fastest, and fair to a busy machine
        figures = vs_llamacpp.measure_ours(load_model(files.checkpoint).model, prompt=16, gen=2, batch_prompt=8)
    assert set(figures) == set(vs_llamacpp.LABELS)
    assert all(math.isfinite(f.tok_s) and f.tok_s > 0 for f in figures.values())


def test_kernel_path_is_named() -> None:
    assert vs_llamacpp.kernel_path()


def test_help_explains() -> None:
    with pytest.raises(SystemExit) as exit_info:
        vs_llamacpp.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_report_has_both_engines_and_ratios(files: vs_llamacpp.WeightFiles, tmp_path) -> None:
    def figures(scale: float) -> dict[str, vs_llamacpp.Figure]:
        return {name: vs_llamacpp.Figure(scale * (i + 1), 0.1) for i, name in enumerate(vs_llamacpp.LABELS)}

    rounds = [vs_llamacpp.Round("llama.cpp", 30.0, figures(2.0), figures(1.0), "fp16"),
              vs_llamacpp.Round("int8serve", 40.0, figures(2.0), figures(3.0), "fp16")]
    args = vs_llamacpp.parse_args(["--layers", "2", "--write", str(tmp_path / "b.md")])
    llama = vs_llamacpp.LlamaCpp(tmp_path / "bin", "0.3.36", {})
    report = vs_llamacpp.build_report(args, rounds, files, llama)
    assert "**1.00×** (rounds: 0.50 / 1.50" in report
    assert "- KV caches: ours fp16 (the default, `--kv-cache auto`), llama.cpp f16 (its default)." in report
    assert "--layers 2" in report and "GB/s" in report and "Our kernel path" in report
    vs_llamacpp.write_section(args.write, report, vs_llamacpp.SCRIPT)
    assert "<!-- benchmarks/vs_llamacpp.py: begin -->" in args.write.read_text()


def test_amx_patch_applies_once(tmp_path) -> None:
    from benchmarks import llamacpp_build

    mmq = tmp_path / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp"
    mmq.parent.mkdir(parents=True)
    mmq.write_text("#include <algorithm>\ninline void f() {\n" + llamacpp_build.AMX_CONFIG_OLD + "}\n")
    assert llamacpp_build.patch_amx(tmp_path)
    patched = mmq.read_text()
    assert "static thread_local tile_config_t tc" in patched and "ARCH_REQ_XCOMP_PERM" in patched
    assert not llamacpp_build.patch_amx(tmp_path)  # already patched (or fixed upstream): left alone


def test_missing_binaries_are_a_clear_error(tmp_path) -> None:
    from benchmarks import llamacpp_build

    with pytest.raises(llamacpp_build.BuildError, match="has no llama-bench"):
        llamacpp_build.LlamaCpp.at(tmp_path)
    assert vs_llamacpp.section_label(2) == "--layers 2"


def test_binaries_built_elsewhere_do_not_claim_our_build_options(tmp_path) -> None:
    from benchmarks import llamacpp_build

    for target in llamacpp_build.TARGETS:
        (tmp_path / target).write_text("#!/bin/sh\n")
        (tmp_path / target).chmod(0o755)
    text = llamacpp_build.LlamaCpp.at(tmp_path).describe()
    assert "not built by `benchmarks/llamacpp_build.py`" in text and "GGML_NATIVE" not in text


def test_a_gguf_file_is_loaded_as_serve_loads_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--gguf: our side is the file's int8 copy in the model cache (made once, then mapped by each round's child);
    llama.cpp's bytes per step are the file's matrices (here the same Q8_0 linears and head as written)."""
    # head_dim = dim / n_heads, as a GGUF without attention.key_length says (TINY keeps the 7B's 128)
    files = vs_llamacpp.write_weights(dataclasses.replace(TINY, head_dim=16), tmp_path / "weights")
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path / "cache"))
    real = vs_llamacpp.gguf_files(files.gguf)
    assert (real.checkpoint, real.gguf, real.gguf_type) == (files.gguf, files.gguf, "Q8_0")
    assert real.q8_0_bytes == files.q8_0_bytes and real.ours_bytes > 0
    assert "2 layers, dim 64" in real.description and "untied head" in real.description
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()] == [
        model_cache.cache_folder(files.gguf).name]
    with engine.torch_threads(1):
        figures = vs_llamacpp.measure_ours(model_cache.load_cached(real.checkpoint).model, prompt=16, gen=2,
                                           batch_prompt=8)
    assert all(math.isfinite(f.tok_s) and f.tok_s > 0 for f in figures.values())


def test_a_gguf_report_names_the_file_and_sets_no_goal(files: vs_llamacpp.WeightFiles, tmp_path) -> None:
    figures = {name: vs_llamacpp.Figure(2.0, 0.1) for name in vs_llamacpp.LABELS}
    real = dataclasses.replace(files, checkpoint=files.gguf, gguf_type="Q4_1", description="a model (2 layers)")
    args = vs_llamacpp.parse_args(["--gguf", str(files.gguf), "--rounds", "1"])
    report = vs_llamacpp.build_report(args, [vs_llamacpp.Round("llama.cpp", 30.0, figures, figures, "bf16")], real,
                                      vs_llamacpp.LlamaCpp(tmp_path / "bin", "0.3.36", {}))
    assert f"same GGUF file ({files.gguf.name})" in report and "| llama.cpp Q4_1 (per round) |" in report
    assert "**1.00×** (rounds: 1.00) |" in report and "goal" not in report
    assert f"--gguf {files.gguf}" in report and "GB of Q4_1" in report
    assert vs_llamacpp.section_label(32, files.gguf) == files.gguf.name


def test_a_missing_gguf_file_is_refused(tmp_path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        vs_llamacpp.parse_args(["--gguf", str(tmp_path / "missing.gguf")])
    assert "no such file" in capsys.readouterr().err


def test_the_full_shape_has_a_section_per_kind_of_cpu(tmp_path) -> None:
    """A run on a Zen 3 must not erase a Zen 4's figures: the 32-layer section is labelled with the CPU."""
    from benchmarks.machine import cpu_label

    label = cpu_label({"Model name": "AMD EPYC", "CPU family": "25", "Model": "1"})
    assert label == "AMD EPYC family 25 model 1"
    assert vs_llamacpp.section_label(32) == cpu_label() != ""
    doc = tmp_path / "b.md"
    for cpu, figure in [("AMD EPYC family 25 model 1", "zen3"), ("AMD EPYC family 25 model 17", "zen4")]:
        vs_llamacpp.write_section(doc, figure, vs_llamacpp.SCRIPT, vs_llamacpp.section_label(32, cpu=cpu))
    vs_llamacpp.write_section(doc, "zen3 again", vs_llamacpp.SCRIPT, vs_llamacpp.section_label(32, cpu=label))
    text = doc.read_text()
    assert "zen4" in text and "zen3 again" in text and "zen3\n" not in text


def test_the_command_shows_the_path_settings_and_binaries_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_KERNEL", "avx2")
    for name in ("INT8SERVE_ATTENTION", "INT8SERVE_PREFILL_MATMUL"):
        monkeypatch.delenv(name, raising=False)
    args = vs_llamacpp.parse_args(["--llama-bin", "/opt/llama/bin", "--layers", "2"])
    command = vs_llamacpp.display_command(args)
    assert command == "INT8SERVE_KERNEL=avx2 python -m benchmarks.vs_llamacpp --layers 2 --llama-bin /opt/llama/bin"


def test_avx2_runs_hold_our_side_to_its_avx2_paths(files: vs_llamacpp.WeightFiles, tmp_path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--isa avx2: our kernels' AVX2 paths (prefill through the int8 kernel's GEMM, as on an AVX2-only CPU), torch's
    and oneDNN's code held to AVX2 too, every figure measured, and a section of its own."""
    # a copy of the environment, so that what hold_to_isa sets leaves with the test
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in vs_llamacpp.PATH_SETTINGS})
    vs_llamacpp.hold_to_isa("avx2")
    assert "avx2" in vs_llamacpp.kernel_path()
    assert {k: os.environ[k] for k in vs_llamacpp.AVX2_SETTINGS} == {
        "INT8SERVE_KERNEL": "avx2", "INT8SERVE_ATTENTION": "avx2", "INT8SERVE_ACTIVATION": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert activation.resolve() == "avx2" and attention.resolve(attention.setting()) == "avx2"
    with engine.torch_threads(1):
        figures = vs_llamacpp.measure_ours(load_model(files.checkpoint).model, prompt=16, gen=2, batch_prompt=8)
    assert set(figures) == set(vs_llamacpp.GOALS)
    rounds = [vs_llamacpp.Round("llama.cpp", 30.0, dict(figures), dict(figures), "bf16")]
    args = vs_llamacpp.parse_args(["--layers", "2", "--isa", "avx2"])
    llama = vs_llamacpp.LlamaCpp(tmp_path / "bin", "0.3.36", {"isa": "avx2"})
    report = vs_llamacpp.build_report(args, rounds, files, llama)
    assert "both held to AVX2 code" in report and "built for AVX2 only" in report
    assert "prefill matmuls: our int8 kernel's avx2 path, every call" in report
    assert "prefill tok/s" in report and "**1.00×**" in report
    assert "python -m benchmarks.vs_llamacpp --layers 2 --isa avx2" in report  # (the settings it implies not shown)
    assert vs_llamacpp.section_label(2, isa="avx2") == "--layers 2 --isa avx2"
    assert vs_llamacpp.section_label(32, cpu="AMD EPYC family 26 model 2", isa="avx2").endswith("model 2 --isa avx2")


def test_avx2_runs_refuse_another_path_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_KERNEL", "vnni512")
    with pytest.raises(SystemExit, match="INT8SERVE_KERNEL=vnni512"):
        vs_llamacpp.hold_to_isa("avx2")


# --isa: what each holds our side to, the kernel path, the words of the report, and the CPU flag it needs
HELD = {
    "avxvnni": ({"INT8SERVE_KERNEL": "avxvnni", "INT8SERVE_ATTENTION": "avx2", "INT8SERVE_ACTIVATION": "avx2",
                 "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"},
                "avx2", "AVX2 and AVX-VNNI code", "AVX2 and AVX-VNNI only", "avx_vnni"),
    "avx512vnni": ({"INT8SERVE_KERNEL": "vnni512", "INT8SERVE_ATTENTION": "avx512", "INT8SERVE_ACTIVATION": "avx512",
                    "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
                   "avx512", "AVX-512 VNNI code without BF16 or AMX", "AVX-512 with VNNI only", "avx512_vnni"),
}


@pytest.mark.parametrize("isa", list(HELD))
def test_runs_held_to_vnni_code_hold_our_side_to_its_paths(isa: str, files: vs_llamacpp.WeightFiles, tmp_path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--isa avxvnni (Intel client CPUs) and avx512vnni (Cascade/Ice Lake): our kernel's path for that code, whose
    GEMM takes prefill, the attention and activation kernels' and torch's matching code, oneDNN held alike, every
    figure measured, and a section of its own."""
    settings, vector_path, code, built, flag = HELD[isa]
    if flag not in cpu_flags():
        pytest.skip(f"this CPU has no {flag}")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in vs_llamacpp.PATH_SETTINGS})
    vs_llamacpp.hold_to_isa(isa)
    assert {k: os.environ[k] for k in vs_llamacpp.PATH_SETTINGS if k in os.environ} == settings
    path = settings["INT8SERVE_KERNEL"]
    assert path in vs_llamacpp.kernel_path()
    assert activation.resolve() == vector_path and attention.resolve(attention.setting()) == vector_path
    with engine.torch_threads(1):
        figures = vs_llamacpp.measure_ours(load_model(files.checkpoint).model, prompt=16, gen=2, batch_prompt=8)
    assert set(figures) == set(vs_llamacpp.GOALS) and all(value.tok_s > 0 for value in figures.values())
    rounds = [vs_llamacpp.Round("llama.cpp", 30.0, dict(figures), dict(figures), "bf16")]
    args = vs_llamacpp.parse_args(["--layers", "2", "--isa", isa])
    llama = vs_llamacpp.LlamaCpp(tmp_path / "bin", "0.3.36", {"isa": isa})
    report = vs_llamacpp.build_report(args, rounds, files, llama)
    assert f"both held to {code}" in report and f"built for {built}" in report
    assert all(f"`{name}={value}`" in report for name, value in settings.items())
    assert f"prefill matmuls: our int8 kernel's {path} path, every call" in report
    assert f"python -m benchmarks.vs_llamacpp --layers 2 --isa {isa}" in report


def test_each_isa_has_its_own_section() -> None:
    labels = {vs_llamacpp.section_label(32, cpu="X", isa=isa) for isa in vs_llamacpp.ISAS}
    assert labels == {"X", "X --isa avx2", "X --isa avxvnni", "X --isa avx512vnni"}


def test_an_isa_the_cpu_lacks_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from int8serve.engine import kernels

    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma"}))
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in vs_llamacpp.PATH_SETTINGS})
    with pytest.raises(SystemExit, match=r"--isa avxvnni needs a CPU with avx2 and avx_vnni, .* no avx_vnni"):
        vs_llamacpp.hold_to_isa("avxvnni")
    assert "INT8SERVE_KERNEL" not in os.environ  # (nothing set on the way out)
    vs_llamacpp.hold_to_isa("avx2")  # what it has is accepted
    assert os.environ["INT8SERVE_KERNEL"] == "avx2"


def test_the_avx2_build_of_llama_cpp_is_kept_apart_and_says_what_it_is(tmp_path) -> None:
    from benchmarks import llamacpp_build

    native, avx2 = llamacpp_build.build_root("0.3.36"), llamacpp_build.build_root("0.3.36", "avx2")
    assert native.name == f"llama-cpp-python-0.3.36-{llamacpp_build.BUILD_TAG}" and avx2.name == native.name + "-avx2"
    assert "-DGGML_NATIVE=ON" not in llamacpp_build.ISA_FLAGS["avx2"]
    assert {"-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX2=ON"} <= set(llamacpp_build.ISA_FLAGS["avx2"])
    text = llamacpp_build.LlamaCpp(tmp_path, "0.3.36", {"isa": "avx2"}).describe()
    assert "built for AVX2 only" in text and "GGML_NATIVE=ON" not in text
    vnni = set(llamacpp_build.ISA_FLAGS["avxvnni"])
    assert {"-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=ON", "-DGGML_AVX2=ON", "-DGGML_NATIVE=OFF"} <= vnni
    assert "-DGGML_AVX_VNNI=OFF" not in vnni
    assert llamacpp_build.build_root("0.3.36", "avxvnni").name == native.name + "-avxvnni"
    text = llamacpp_build.LlamaCpp(tmp_path, "0.3.36", {"isa": "avxvnni"}).describe()
    assert "built for AVX2 and AVX-VNNI only (no AVX-512)" in text and "-DGGML_AVX_VNNI=ON" in text
    avx512 = set(llamacpp_build.ISA_FLAGS["avx512vnni"])
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_INT8=OFF"} <= avx512
    text = llamacpp_build.LlamaCpp(tmp_path, "0.3.36", {"isa": "avx512vnni"}).describe()
    assert "built for AVX-512 with VNNI only (no AVX512-BF16, no AMX)" in text


def test_kv_cache_and_batch_position_runs_are_their_own_sections_without_the_goals() -> None:
    """--kv-cache int8 (ours int8 rows, llama.cpp q8_0) and --batch-prompt N: their own sections, flags in the
    command and in llama.cpp's tool lines, and no goal verdicts (the issue's goals are for the defaults)."""
    args = vs_llamacpp.parse_args(["--kv-cache", "int8", "--batch-prompt", "1024"])
    assert vs_llamacpp.variant(args) and not vs_llamacpp.variant(vs_llamacpp.parse_args([]))
    label = vs_llamacpp.section_label(32, cpu="X", kv_cache="int8", batch_prompt=1024)
    assert label == "X --kv-cache int8 --batch-prompt 1024" != vs_llamacpp.section_label(32, cpu="X")
    assert "--kv-cache int8 --batch-prompt 1024" in vs_llamacpp.display_command(args)
    tools = vs_llamacpp.llama_cpp_tools(1024, "int8")
    assert tools["decode_b4"] == "`llama-batched-bench -npp 1024 -ntg 32 -npl 4 -ctk q8_0 -ctv q8_0`"
    assert vs_llamacpp.llama_cpp_tools()["decode_b1"] == "`llama-bench -n 32`"
    assert vs_llamacpp.kv_cache_line("int8", []) == ("- KV caches: ours int8 rows (`--kv-cache int8`), llama.cpp "
                                                     "q8_0 (`-ctk q8_0 -ctv q8_0`).")
    for kind in ("fp16", "bf16"):  # a 16-bit cache of ours against llama.cpp's f16: its own section, no goals
        args = vs_llamacpp.parse_args(["--kv-cache", kind])
        assert vs_llamacpp.variant(args)
        assert vs_llamacpp.llama_cpp_tools(kv_cache=kind)["decode_b1"] == "`llama-bench -n 32`"
        assert vs_llamacpp.section_label(32, cpu="X", kv_cache=kind) == f"X --kv-cache {kind}"
        rounds = [vs_llamacpp.Round("llama.cpp", 30.0, {}, {}, kind)]
        assert vs_llamacpp.kv_cache_line(kind, rounds) == (f"- KV caches: ours {kind} (`--kv-cache {kind}`), "
                                                           "llama.cpp f16 (its default).")
    with pytest.raises(SystemExit):
        vs_llamacpp.parse_args(["--batch-prompt", "0"])


def test_a_run_with_our_int8_prefill_pass_is_its_own_section_without_the_goals(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    """--prefill-matmul int8 (our prefill with llama.cpp's numerics): its own section, the flag in the command (not
    the variable it sets for our child as well), no goal verdicts; a contradicting environment is refused."""
    monkeypatch.delenv(vs_llamacpp.PREFILL_ENV, raising=False)
    args = vs_llamacpp.parse_args(["--prefill-matmul", "int8"])
    assert vs_llamacpp.variant(args)
    assert vs_llamacpp.section_label(32, cpu="X", prefill_matmul="int8") == "X --prefill-matmul int8"
    monkeypatch.setenv(vs_llamacpp.PREFILL_ENV, "int8")  # (as main sets it for the child)
    command = vs_llamacpp.display_command(args)
    assert "--prefill-matmul int8" in command and "INT8SERVE_PREFILL_MATMUL" not in command
    monkeypatch.setenv(vs_llamacpp.PREFILL_ENV, "dense")
    with pytest.raises(SystemExit, match="INT8SERVE_PREFILL_MATMUL=dense"):
        vs_llamacpp.main(["--prefill-matmul", "int8", "--layers", "1"])
    monkeypatch.delenv(vs_llamacpp.PREFILL_ENV)  # bf16 (the bf16 kernel's prefill): a section of its own too
    assert vs_llamacpp.variant(vs_llamacpp.parse_args(["--prefill-matmul", "bf16"]))
    assert vs_llamacpp.section_label(32, cpu="X", prefill_matmul="bf16") == "X --prefill-matmul bf16"
    assert vs_llamacpp.variant(vs_llamacpp.parse_args(["--prefill-matmul", "row-exact"]))


@pytest.mark.parametrize("asked", ["auto", "int8"])
def test_our_child_reports_the_kv_cache_it_kept(asked: str, files: vs_llamacpp.WeightFiles,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The child keeps the server's default cache (auto: Transformer.default_kv_cache for the server's chunks and
    slots) or the one --kv-cache asked for, and says which beside its figures."""
    kept = {}

    def measure(model, batch_prompt):  # (test_our_side_measures measures the figures): the cache here
        kept["kind"] = model.kv_cache
        kept["default"] = model.default_kv_cache(vs_llamacpp.DEFAULT_PREFILL_CHUNK, 4)[0]
        return {name: vs_llamacpp.Figure(1.5, 0.1) for name in vs_llamacpp.LABELS}

    monkeypatch.setattr(vs_llamacpp, "measure_ours", measure)
    if asked != "auto":
        monkeypatch.setenv(vs_llamacpp.KV_ENV, asked)
    else:
        monkeypatch.delenv(vs_llamacpp.KV_ENV, raising=False)
    vs_llamacpp.ours_child(files.checkpoint)
    figures, kind = vs_llamacpp.parse_ours(capsys.readouterr().out)
    assert kind == kept["kind"] == (kept["default"] if asked == "auto" else asked)
    assert set(figures) == set(vs_llamacpp.LABELS) and figures["decode_b1"].tok_s == 1.5
