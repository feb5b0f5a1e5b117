"""Mistakes get one line that says what is wrong and what to do, and a non-zero exit."""

import socket
import subprocess
import sys
import textwrap

import pytest

from test_cli import CLI, ROOT, _env, _start_peer, _stop


def _run(tmp_path, *args, timeout=90, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True,
                          env=env or _env(tmp_path), cwd=ROOT, timeout=timeout)


def _one_line(out, expected: str):
    assert out.returncode != 0, out
    assert out.stderr.splitlines() == [expected], out.stderr
    assert out.stdout == ""


def test_missing_profile(tmp_path):
    _one_line(_run(tmp_path, "peer", "--profile", "nope.toml"),
              "p2pgrid peer: no profile at nope.toml")


def test_bad_profile_key_and_unknown_generator(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[peer]\nname = "h"\nmdsn = false\n')
    _one_line(_run(tmp_path, "peer", "--profile", str(p)),
              f"p2pgrid peer: {p}: unknown key 'mdsn' in [peer]; did you mean 'mdns'?")
    p.write_text('[peer]\nname = "h"\n[[dataset]]\nid = "d"\ngenerator = "birth"\n')
    _one_line(_run(tmp_path, "peer", "--profile", str(p)),
              f"p2pgrid peer: {p}: [[dataset]] d: unknown generator 'birth' (one of "
              "birth_records, digits, randn; or give path = FILE)")


@pytest.mark.parametrize("command", [["peer", "--name", "x"], ["search", "#x"]])
def test_malformed_join(tmp_path, command):
    _one_line(_run(tmp_path, *command, "--no-mdns", "--join", "hospital"),
              f"p2pgrid {command[0]}: --join 'hospital': give HOST:PORT or KEYID@HOST:PORT "
              "(as `p2pgrid peer` prints it)")


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line(_run(tmp_path, "peer", "--name", "x", "--no-mdns", "--port", str(port)),
                  f"p2pgrid peer: port {port} is in use (another peer or program listens "
                  "there); pick another --port or stop that one")


def test_same_peer_twice_and_wrong_pinned_key(tmp_path):
    data = tmp_path / "h"
    proc, seed, _ = _start_peer(tmp_path, "--name", "h", "--no-mdns", "--data-dir", str(data))
    try:
        _one_line(_run(tmp_path, "peer", "--name", "h", "--no-mdns", "--data-dir", str(data)),
                  f"p2pgrid peer: this peer is already running (its store in {data} is open); "
                  "stop it first, or give another --name or --data-dir")
        wrong = "0123456789abcdef@" + seed.split("@")[1]
        out = _run(tmp_path, "search", "#x", "--as", "bob", "--no-mdns", "--join", wrong,
                   "--wait", "3")
        assert out.returncode == 1
        assert f"seed {seed.split('@')[1]} is not the peer --join named" in out.stderr
        assert out.stderr.splitlines()[-1].startswith("no peer reached in 3s")
    finally:
        _stop(proc)


def test_search_reaching_nobody_says_so(tmp_path):
    out = _run(tmp_path, "search", "#x", "--as", "bob", "--no-mdns", "--join", "127.0.0.1:9",
               "--wait", "2")
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if "no network key" not in ln]  # member's TOFU note
    assert len(lines) == 2 and "seed 127.0.0.1:9 unreachable" in lines[0], out.stderr
    assert lines[1] == ("no peer reached in 2s, so nothing was searched; give --join "
                        "KEYID@HOST:PORT (as `p2pgrid peer` prints it) or check that mDNS "
                        "works here")
    assert "owner login" not in out.stderr  # a one-shot peer serves no console
    # nor leaves its data behind: only bob's key stays, so his name stays his on every peer
    assert [p.name for p in (tmp_path / "home" / "bob").iterdir()] == ["identity.key"]


def test_user_unset_is_said(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if k not in ("USER", "USERNAME")}
    out = _run(tmp_path, "search", "#x", "--no-mdns", "--wait", "0.5", env=env)
    assert "$USER is not set; your name on the network is 'cli' (give --as NAME)" in out.stderr


@pytest.mark.parametrize("raise_, last", [("ValueError('mine')", "ValueError: mine"),
                                          ("KeyboardInterrupt", "KeyboardInterrupt")])
def test_script_gets_its_own_exception(tmp_path, raise_, last):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(f"""
        import trio, p2pgrid
        async def main():
            async with p2pgrid.connect("s", mdns=False, data_dir={str(tmp_path / 's')!r}, wait=0):
                raise {raise_}
        trio.run(main)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=_env(tmp_path), cwd=ROOT, timeout=90)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == last, out.stderr
    assert "ExceptionGroup" not in out.stderr


@pytest.mark.parametrize("script", ["fl_mnist.py", "smpc_mnist.py", "fl_sms.py", "tiny_gpt.py"])
def test_example_without_data_says_where_to_get_it(tmp_path, script):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--data",
                          str(tmp_path / "none")], capture_output=True, text=True,
                         env=_env(tmp_path), cwd=ROOT, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: no data at {tmp_path / 'none'}")
    assert "comes from https://" in lines[0]


def test_every_option_has_help():
    import argparse

    from p2pgrid.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and not action.help and action.dest != "help":
                missing.append(f"{path} {action.option_strings[-1]}")
    walk(build_parser(), "p2pgrid")
    assert not missing, missing
