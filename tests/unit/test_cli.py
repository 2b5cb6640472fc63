"""The command line's edges: the platform choice, and the benchmark suite that is not installed."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from sgxvtpm.cli import main


def test_hostd_on_a_platform_this_machine_cannot_run_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["hostd", "--state-dir", str(tmp_path / "state"), "--platform", "gramine"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("sgxvtpm: error: platform 'gramine' needs")
    assert not (tmp_path / "state" / "platform").exists()  # nothing provisioned


def test_an_unknown_platform_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["hostd", "--state-dir", str(tmp_path), "--platform", "tdx"])
    assert exited.value.code == 2
    assert "invalid choice: 'tdx'" in capsys.readouterr().err


def test_bench_outside_a_source_checkout_says_where_the_suite_is(tmp_path: Path) -> None:
    """The installed package has no ``benchmarks``: importing the CLI never needs it, and
    ``sgxvtpm bench`` says where it lives instead of a traceback."""
    isolated = [sys.executable, "-I"]  # no cwd (the repository) on sys.path
    subprocess.run([*isolated, "-c", "import sgxvtpm.cli"], cwd=tmp_path, check=True)
    done = subprocess.run([*isolated, "-m", "sgxvtpm.cli", "bench", "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("sgxvtpm: error: the benchmark suite is not installed")
    assert "Traceback" not in done.stderr


def test_version_prints_the_package_version_and_exits_0(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sgxvtpm {version('sgxvtpm')}\n"


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sgxvtpm: error: "), err
    return err.removeprefix("sgxvtpm: error: ").strip()


def test_hostd_on_a_state_dir_that_is_a_file_says_it_is_not_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").write_text("")
    assert main(["hostd", "--state-dir", str(tmp_path / "state")]) == 1
    message = _one_error(capsys)
    assert message.startswith(f"the state directory {tmp_path / 'state'} is not a directory")
    assert "--state-dir" in message and "Errno" not in message


def test_hostd_on_a_state_dir_too_long_for_its_socket_names_the_socket_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / ("s" * (114 - len(str(tmp_path)) - 1))
    assert len(str(state)) == 114
    socket_path = state / "hostd.sock"
    assert main(["hostd", "--state-dir", str(state)]) == 1
    message = _one_error(capsys)
    assert message.startswith(f"hostd's socket path {socket_path} is {len(str(socket_path))} "
                              "bytes, more than the 107 AF_UNIX allows")
    assert "shorter --state-dir" in message
    assert not state.exists()  # refused before anything was made


def test_vm_create_with_an_unknown_pcr_bank_is_refused_before_contacting_hostd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no hostd runs on tmp_path: the bank is refused before anything is contacted
    status = main(["vm", "create", "vm1", "--pcr-banks", "sha256,sha999",
                   "--state-dir", str(tmp_path)])
    assert status == 1
    message = _one_error(capsys)
    assert message.startswith("--pcr-banks: unknown PCR bank 'sha999'; use sha1, sha256")
    assert "hostd" not in message


@pytest.mark.parametrize(("option", "bad", "says"), [
    ("--log", "path=/tmp/x", "--log: expected file=..., level=..., got 'path=/tmp/x'"),
    ("--log", "file=/tmp/x,level=loud", "--log: level must be one of debug, info, warning"),
    ("--log", "level=debug", "--log: file=PATH is required"),
    ("--pid", "file=", "--pid: expected file=..., got 'file='"),
])
def test_log_and_pid_options_in_swtpm_syntax_refuse_what_they_do_not_know(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, bad: str, says: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["hostd", "--state-dir", str(tmp_path), option, bad])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_log_level_filters_records_and_logging_records_become_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json
    import logging

    from sgxvtpm.util import log

    stream = io.StringIO()
    log.configure("test", stream, level="warning")
    try:
        log.log("quiet.info")
        log.log("loud.warning", level="warning")
        logging.getLogger("sgxvtpm.enclave").info("routine")
        logging.getLogger("sgxvtpm.enclave").error("bad %d", 1)
    finally:
        log.configure("sgxvtpm", sys.stderr, level="info")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["event"], r["level"]) for r in records] == [
        ("loud.warning", "warning"), ("enclave.log", "error")]
    assert records[1]["message"] == "bad 1"
    assert capsys.readouterr().err == ""  # nothing through logging's plain last resort


def test_every_argument_has_help_and_every_subcommand_an_example() -> None:
    from sgxvtpm.cli import build_parser, subcommands

    parser = build_parser()
    found = subcommands(parser)
    assert {"hostd", "vm create", "vm tpm", "vm serve", "attest verify", "ca show"} <= {
        w for w, _ in found}
    for words, sub in [("", parser), *found]:
        for action in sub._actions:
            assert action.help, f"`sgxvtpm {words}` {action.dest}: no help"
        if words:
            assert sub.epilog and sub.epilog.startswith("example:\n  sgxvtpm " + words), words
            assert f"sgxvtpm {words}" in sub.format_help()


def test_make_man_writes_a_man_page_naming_every_subcommand(tmp_path: Path) -> None:
    from sgxvtpm.cli import build_parser, subcommands

    page = tmp_path / "man" / "sgxvtpm.1"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["make", "-s", "-o", "install", "man", f"MANPAGE={page}"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert text.startswith(".TH SGXVTPM \"1\"")
    for words, _ in subcommands(build_parser()):
        escaped = words.replace("-", "\\-")  # roff escapes hyphens
        assert f"'sgxvtpm {escaped}'" in text, words
    assert "sgxvtpm vm tpm vm1 80010000000c0000017b0008" in text  # the examples too


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "seconds", "said"), [
    (True, 0.3, True), (True, 0.0, False), (False, 0.3, False)])
def test_vm_create_says_what_it_does_only_when_slow_and_only_on_a_terminal(
    tty: bool, seconds: float, said: bool
) -> None:
    import asyncio

    from sgxvtpm.cli import progress

    stream = _Terminal(tty)

    async def work() -> None:
        async with progress("creating vm1...", stream, after=0.1):
            await asyncio.sleep(seconds)

    asyncio.run(work())
    assert stream.getvalue() == ("creating vm1...\n" if said else "")


def test_vm_show_prints_lists_as_lists_and_the_ek_kinds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sgxvtpm.cli import _print
    from sgxvtpm.wire.k1 import InstanceInfo

    info = InstanceInfo(name="vm1", instance_id="ab" * 16, pcr_banks=("sha256", "sha384"),
                        ek=("rsa2048", "ecc-p256"), created=0.0, state="running")
    _print(info, False)
    out = capsys.readouterr().out
    assert "pcr_banks    sha256,sha384\n" in out and "ek           rsa2048,ecc-p256\n" in out
    assert "[" not in out


@pytest.mark.parametrize("command", [
    ["vm", "create", "vm1"], ["vm", "list"], ["ca", "show"],
    ["vm", "serve", "vm1", "--swtpm", "{tmp}/s"], ["vm", "attach", "vm1", "--ctrl", "{tmp}/c"],
    ["vm", "tpm", "vm1", "80010000000c0000017b0008"], ["attest", "verify", "vm1"],
], ids=lambda c: " ".join(c[:2]))
def test_every_client_names_a_state_dir_that_is_a_file_or_too_long(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    (tmp_path / "file").write_text("")
    assert main([*args, "--state-dir", str(tmp_path / "file")]) == 1
    assert _one_error(capsys).startswith(f"the state directory {tmp_path / 'file'} is not a "
                                         "directory: give --state-dir a directory")
    long = tmp_path / ("s" * (114 - len(str(tmp_path)) - 1))
    assert main([*args, "--state-dir", str(long)]) == 1
    message = _one_error(capsys)
    assert message.startswith(f"hostd's socket path {long / 'hostd.sock'} is ")
    assert "more than the 107 AF_UNIX allows: give a shorter --state-dir" in message


def test_a_vmm_command_with_hostd_down_says_how_to_start_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["vm", "list", "--state-dir", str(state)]) == 1
    message = _one_error(capsys)
    assert message.startswith(f"cannot reach hostd at {state / 'hostd.sock'}")
    assert message.endswith(f"start it with `sgxvtpm hostd --state-dir {state}`")
