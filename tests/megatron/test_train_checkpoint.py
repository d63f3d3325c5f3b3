"""Training checkpoints: keep-last-K, atomicity under a crashed save, resume, preemption signals."""

from __future__ import annotations

import pytest
import torch
import train_ckpt_jobs
from runner import run_distributed


def test_keep_last_and_resume_at_another_tp(tmp_path):
    saved = run_distributed(train_ckpt_jobs.save_job, 2, str(tmp_path), [1, 2, 3], 2, None, timeout=300)
    res = run_distributed(train_ckpt_jobs.resume_job, 1, str(tmp_path), timeout=300)[0]
    assert res["steps"] == [2, 3] and res["path"].endswith("iter_0000003")
    assert res["train_state"] == {"step": 3, "consumed_samples": 24}
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    # TP=2 shards saved, loaded at TP=1: compare the replicated (non-TP) parameters directly
    for name, p in res["params"].items():
        other = saved[0]["params"][name]
        if other.shape == p.shape:
            torch.testing.assert_close(p, other, rtol=0, atol=0, msg=name)


def test_crashed_save_never_shadows_the_last_good_checkpoint(tmp_path):
    run_distributed(train_ckpt_jobs.save_job, 2, str(tmp_path), [1, 2, 3], 3, 3, timeout=300)
    assert (tmp_path / ".iter_0000003.partial").is_dir()  # what the crash left behind
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    res = run_distributed(train_ckpt_jobs.resume_job, 1, str(tmp_path), timeout=300)[0]
    assert res["path"].endswith("iter_0000002") and res["train_state"]["step"] == 2
    # even if `latest` pointed at an incomplete folder, resume falls back to the newest complete one
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")
    (tmp_path / ".iter_0000003.partial").rename(tmp_path / "iter_0000003")
    res = run_distributed(train_ckpt_jobs.resume_job, 1, str(tmp_path), timeout=300)[0]
    assert res["path"].endswith("iter_0000002")


def test_preemption_signal_on_one_rank_stops_all():
    seen = run_distributed(train_ckpt_jobs.signal_job, 2, timeout=120)
    assert seen == [[False, True], [False, True]]


def test_keep_last_validation(tmp_path):
    from dms_megatron.training.checkpoint import latest_checkpoint, save_checkpoint

    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, {}, keep_last=0)


def test_damaged_checkpoints_are_skipped_then_refused(tmp_path):
    from dms_megatron.convert.file_records import FILE_RECORD, CorruptCheckpointError
    from dms_megatron.training.checkpoint import latest_checkpoint, load_checkpoint

    run_distributed(train_ckpt_jobs.save_job, 1, str(tmp_path), [1, 2, 3], None, None, timeout=300)
    assert all((tmp_path / f"iter_000000{s}" / FILE_RECORD).is_file() for s in (1, 2, 3))
    assert latest_checkpoint(tmp_path).name == "iter_0000003"
    shard = next((tmp_path / "iter_0000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: \d+ bytes, \d+ when saved"):
        load_checkpoint(tmp_path / "iter_0000003", {})
    assert latest_checkpoint(tmp_path).name == "iter_0000002"
    metadata = tmp_path / "iter_0000002" / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: the pickled index torch would load
    metadata.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path).name == "iter_0000001"
    (tmp_path / "iter_0000001" / "metadata.json").unlink()
    refused = r"every complete checkpoint .* damaged(.|\n)*metadata.json: missing"
    with pytest.raises(CorruptCheckpointError, match=refused):
        latest_checkpoint(tmp_path)
    # the trainer's resume path: an emptied newest shard -> the older intact checkpoint is loaded
    run_distributed(train_ckpt_jobs.save_job, 1, str(tmp_path / "again"), [1, 2], None, None, timeout=300)
    shard = next((tmp_path / "again" / "iter_0000002").glob("*.distcp"))
    shard.write_bytes(b"")
    res = run_distributed(train_ckpt_jobs.resume_job, 1, str(tmp_path / "again"), timeout=300)[0]
    assert res["path"].endswith("iter_0000001") and res["train_state"]["step"] == 1


def test_failed_save_names_the_cause_and_keeps_the_last_checkpoint(tmp_path):
    message = run_distributed(train_ckpt_jobs.size_limited_save_job, 1, str(tmp_path), 4096, timeout=300)[0]
    assert "saving checkpoint iter_0000002" in message and "file-size limit" in message
    assert f"the last complete checkpoint {tmp_path / 'iter_0000001'} is kept" in message
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not (tmp_path / "iter_0000002").exists()


def test_save_cut_anywhere_resumes_from_the_last_complete_checkpoint(tmp_path):
    """A save cut at four points (inside the shard writes, inside the file record, before the rename,
    after it but before ``latest`` moves): resume takes the checkpoint before it (``latest`` still names
    it) and loads exactly what was saved there. Two cuts are real SIGKILLs of the saving process; the
    other two stop the save by an exception nothing catches, which leaves the same files behind."""
    from runner import RankFailedError

    phases = list(train_ckpt_jobs.KILL_PHASES)
    for phase in ("writing_shards", "marking_complete"):
        with pytest.raises(RankFailedError):
            run_distributed(
                train_ckpt_jobs.killed_save_job, 1, str(tmp_path), [1, 2], [phase], True, timeout=300
            )
    run_distributed(
        train_ckpt_jobs.killed_save_job,
        1,
        str(tmp_path),
        [1, 2],
        ["recording_files", "updating_latest"],
        False,
    )
    res = run_distributed(train_ckpt_jobs.resume_after_cut_job, 1, str(tmp_path), phases, timeout=300)[0]
    for phase in phases:
        got = res["resumed"][phase]
        assert got["train_state"]["step"] == 1 and got["path"].endswith("iter_0000001"), (phase, got["path"])
        for name, p in got["params"].items():
            torch.testing.assert_close(p, res["step1"][name], rtol=0, atol=0, msg=f"{phase}: {name}")
