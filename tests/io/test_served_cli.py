"""`minitron teacher-logits import|export` on records generated in vLLM's documented shape (no server)."""
from __future__ import annotations

import json

from minitron.cli import main
from minitron.io.logit_store import TeacherLogitStore
from tests.io.test_served import (K, check_store, teacher_logprobs, tok, tok_dir, vllm_records,  # noqa: F401
                                  write_lines)


def test_cli_import_export_round_trip_and_bad_record(tok, tok_dir, tmp_path, capsys):  # noqa: F811
    ids, lp = teacher_logprobs(2, len(tok))
    recs = write_lines(tmp_path / "vllm.jsonl", vllm_records(ids, lp))
    store = tmp_path / "store"
    assert main(["teacher-logits", "import", "--format", "vllm", str(recs), "--tokenizer", str(tok_dir),
                 "--output", str(store), "--value-encoding", "fp32"]) == 0
    s = TeacherLogitStore(store)
    assert s.k == K
    check_store(s, ids, lp, last=False)
    out = tmp_path / "store.jsonl"
    assert main(["teacher-logits", "export", str(store), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + ids.shape[0]  # a header, then one line per sequence
    assert json.loads(lines[1])["token_ids"] == ids[0].tolist()
    # the exported JSONL imports again into the same store contents
    again = tmp_path / "again"
    assert main(["teacher-logits", "import", "--format", "jsonl", str(out), "--tokenizer", str(tok_dir),
                 "--output", str(again), "--value-encoding", "fp32"]) == 0
    check_store(TeacherLogitStore(again), ids, lp, last=False)
    # a token id beyond the tokenizer: exit 2, the record's line named, nothing written
    bad = vllm_records(ids, lp)
    bad[1]["prompt_token_ids"][3] = len(tok) + 7
    bad_file = write_lines(tmp_path / "bad.jsonl", bad)
    capsys.readouterr()
    assert main(["teacher-logits", "import", "--format", "vllm", str(bad_file), "--tokenizer", str(tok_dir),
                 "--output", str(tmp_path / "never")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
