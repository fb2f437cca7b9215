"""The `mlsm` command group: global options and a --help that lists every stage."""
import torch
from click.testing import CliRunner

from mlsm.cli import cli


def test_threads_option_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        target = 1 if before != 1 else 2
        res = CliRunner().invoke(cli, ["--threads", str(target), "export", "--help"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == target
        bad = CliRunner().invoke(cli, ["--threads", "0", "export", "--help"])
        assert bad.exit_code != 0 and "--threads" in bad.output
    finally:
        torch.set_num_threads(before)


def test_group_help_lists_every_command():
    out = CliRunner().invoke(cli, ["--help"]).output
    described = out.split("Options:")[0]
    for name in cli.commands:
        assert f"mlsm {name}" in described, f"`mlsm --help` does not describe `mlsm {name}`"


def test_the_old_worker_flags_still_work_hidden_and_warned(caplog):
    import click

    from mlsm.core.config import ExtractConfig, click_options, from_cli

    seen = {}

    @click.command()
    @click_options(ExtractConfig)
    def cmd(**kw):
        seen["cfg"] = from_cli(ExtractConfig, kw)

    res = CliRunner().invoke(cmd, ["--corpus", "c.txt", "--layers", "6", "--shard-index", "1", "--num-shards", "3"])
    assert res.exit_code == 0, res.output
    assert (seen["cfg"].worker_index, seen["cfg"].num_workers) == (1, 3)
    assert "--shard-index is deprecated; use --worker-index" in caplog.text
    helptext = CliRunner().invoke(cmd, ["--help"]).output
    assert "--worker-index" in helptext and "--shard-index" not in helptext
