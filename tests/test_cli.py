"""`emoe` command line: generate, and bad input as one clear `emoe: ...` line."""
import pytest

from emoe.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate(tiny_mixtral, capsys):
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "3"])
    out, err = capsys.readouterr()
    assert out.strip()  # the decoded text (gibberish, but something)
    assert "hit rate" in err and "[emoe]" in err and "tokens/s" in err


def test_generate_low_budget_load(tiny_mixtral, capsys):
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "3", "--budget", "0.4",
          "--miss-policy", "load", "--raw", "--temperature", "0.7", "--seed", "1"])
    _, err = capsys.readouterr()
    assert "hit rate" in err


def test_unprofiled_model_under_a_budget_says_what_rerouting_costs(tiny_mixtral, capsys):
    """Without a profile the default is auto (exact; from disk every miss loads); rerouting, asked for,
    comes with a warning that it changes outputs."""
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "2", "--budget", "0.5"])
    err = capsys.readouterr().err
    assert "has no profile" not in err and "loaded" in err and "0.0 MiB" not in err
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "2", "--budget", "0.5",
          "--miss-policy", "reroute"])
    assert "has no profile" in capsys.readouterr().err
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "2", "--budget", "0.5",
          "--miss-policy", "host"])
    err = capsys.readouterr().err
    assert "has no profile" not in err and "expert runs on the host" in err


def test_a_profile_inside_a_model_folder_names_the_model(tiny_mixtral, tmp_path):
    """`emoe profile --out DIR/profile` then `emoe train-predictor DIR/profile`: the model is DIR."""
    from argparse import Namespace

    from emoe.commands import _model
    assert _model(Namespace(model=None, profile=str(tiny_mixtral / "profile"))) == str(tiny_mixtral)
    assert _model(Namespace(model="/elsewhere", profile=str(tiny_mixtral / "profile"))) == "/elsewhere"
    assert _model(Namespace(model=None, profile=str(tmp_path / "p"))) != str(tmp_path)  # no config.json there


def test_generate_json_schema(tiny_mixtral, capsys, tmp_path):
    """--json-schema: the tiny model's answer is a JSON document of the schema (inline, from a file, or any
    object); a schema that does not compile is one line, before the model loads."""
    import json
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    for given in (json.dumps(schema), str(tmp_path / "s.json")):
        main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "30", "--json-schema", given])
        assert set(json.loads(capsys.readouterr().out)) == {"ok"}
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "40", "--json-schema", "object",
          "--temperature", "0"])
    out = capsys.readouterr().out.strip()
    assert out.startswith("{")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", "/nonexistent", "--json-schema", '{"type": "frob"}'])
    assert str(exc.value.code) == "emoe: JSON schema: Invalid type: frob"


def test_missing_model_folder():
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", "/nonexistent", "--max-tokens", "3"])
    msg = str(exc.value.code)
    assert msg.startswith("emoe:") and "/nonexistent" in msg


def test_budget_too_small(tiny_mixtral):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", str(tiny_mixtral), "--budget", "0.00001", "--miss-policy", "reroute"])
    msg = str(exc.value.code)
    assert msg.startswith("emoe:") and "budget" in msg and "top-2" in msg
    assert "\n" not in msg  # one line, no traceback


def test_auto_runs_every_expert_on_the_host_when_the_budget_holds_none(tiny_mixtral, capsys):
    main(["generate", "hi", "--model", str(tiny_mixtral), "--budget", "0.00001", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert "resident experts 0.0/" in err and "expert runs on the host" in err


def test_bad_argument_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--miss-policy", "lru"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_policy_without_a_budget_is_refused(tiny_mixtral):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", str(tiny_mixtral), "--policy", "emoe-a-q48", "--max-tokens", "2"])
    assert "--policy needs a profile" in str(exc.value.code)


def test_serve_threads_default_to_the_cores_available(monkeypatch):
    import os

    from emoe.server import serve_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert serve_threads(None) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert serve_threads(None) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert serve_threads(None) == 1 and serve_threads(3) == 3
    with pytest.raises(ValueError, match="--threads"):
        serve_threads(0)


def test_generate_bf16_fast_tier_holds_half_the_bytes(tiny_mixtral, capsys):
    import re
    mib = {}
    for dtype in ("float32", "bfloat16"):
        main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "2", "--budget", "0.5",
              "--miss-policy", "load", "--dtype", dtype])
        mib[dtype] = float(re.search(r"resident experts [\d.]+/([\d.]+) MiB", capsys.readouterr().err).group(1))
    assert mib["bfloat16"] == pytest.approx(mib["float32"] / 2, rel=0.02)


@pytest.mark.parametrize("text, says", [("not json", "is not an `emoe eval --json` file"),
                                        ('{"a": 1}', "expected a list of records"),
                                        ('[{"policy": "x", "budget": 0.4}]', "kept no texts")])
def test_rescore_refuses_what_it_cannot_fill_in_and_leaves_the_file(tmp_path, text, says):
    f = tmp_path / "eval.json"
    f.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["rescore", str(f)])
    assert str(exc.value.code).startswith("emoe:") and says in str(exc.value.code)
    assert f.read_text() == text


def test_activations_choose_what_runs_the_forms(tiny_mixtral, capsys, monkeypatch):
    """--activations sets the few-row routines' mode for the process (EMOE_KQ's values), asked: an engine over a
    GGUF keeps it too; a bad one is refused."""
    from emoe import ckernel
    monkeypatch.setattr(ckernel, "KQ", ckernel.KQ)  # restored afterwards
    monkeypatch.setattr(ckernel, "ASKED", ckernel.ASKED)
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "2", "--activations", "torch"])
    assert ckernel.KQ == ckernel.ASKED == "off"
    main(["generate", "hi", "--model", str(tiny_mixtral), "--max-tokens", "2", "--activations", "int8"])
    assert ckernel.KQ == ckernel.ASKED == "int8" and ckernel.for_gguf() is None
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--model", str(tiny_mixtral), "--activations", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
