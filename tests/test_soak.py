"""A soak of the completion demo served by its own process: two users complete over and over while a
third clicks in the "Inside the model" tab. Every request is answered, the server's memory does not
grow after warm-up, and neither do its temporary files."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from conftest import serve_process, stop_process
from gradio_client import Client

from igpt_core.model import ModelConfig
from tests.test_demo import ROOT, WHOLE, as_input, free_port
from tests.test_model_cache import make_run, model_bytes

# 8x8 digits-shaped, wide enough (25 MB) that a model or a decoder (which holds its own copy of the
# weights) left behind by each request would show in the server's memory.
WIDE = ModelConfig(vocab_size=17, n_positions=64, n_layer=2, n_head=4, n_embd=512)
ROUNDS, WARM_UP = 25, 5  # per completing user: 50 completions in all


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_two_users_complete_while_a_third_looks_inside_and_nothing_grows(tmp_path):
    run = make_run(tmp_path / "runs", WIDE, steps=[1], name="wide")
    temp = tmp_path / "gradio"
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(temp), TMPDIR=str(tmp_path), GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    server, _ = serve_process([sys.executable, str(ROOT / "apps" / "demo.py"), "--port", str(port), "--runs-dir", str(run.path.parent)],
                              port, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        warm, done, errors = threading.Barrier(3), [], []
        measured, series = {}, []

        def user(index: int, action) -> None:
            try:
                downloads = tmp_path / f"downloads-{index}"
                c = Client(url, verbose=False, download_files=str(downloads))
                editor = as_input(c.predict("wide", index, api_name="/use_example")[0])
                for r in range(ROUNDS):
                    if r == WARM_UP:
                        warm.wait(timeout=300)
                        if index == 0:  # once all three are warm: the server's memory and files then
                            measured["warm"] = resident(server.pid), files_under(temp)
                        warm.wait(timeout=300)
                    done.append(action(c, editor, r))
                    if index == 0:
                        series.append(resident(server.pid) >> 20)
            except Exception as err:  # reported below, with the user it happened to
                errors.append(f"user {index}: {err!r}")
                warm.abort()

        def complete(c, editor, r):  # the same request each round: its images are the same cached files
            grid, text = c.predict("wide", 1, editor, *WHOLE, 4, 2, 1.0, 0, 7, "every row", api_name="/complete")
            return text.startswith("Done")

        def look_inside(c, editor, r):
            bars, text, numbers = c.predict(f"{5 + r % 2}, 3", 1.0, 0, "wide", 1, editor, *WHOLE,
                                            api_name="/inside_distribution")
            return numbers["pixel"] == [5 + r % 2, 3]

        users = [threading.Thread(target=user, args=(i, action))
                 for i, action in enumerate([complete, complete, look_inside])]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join(timeout=600)
        assert not errors, errors
        assert len(done) == 3 * ROUNDS and all(done), "every request answered, and answered right"
        warm_rss, warm_files = measured["warm"]
        growth = resident(server.pid) - warm_rss
        # one model's bytes: any request that left its model, decoder or cache behind would add that 20 times
        assert growth < model_bytes(WIDE), f"the server grew by {growth >> 20} MB after warm-up: {series}"
        assert files_under(temp) == warm_files, "requests after warm-up left new temporary files"
        assert not [p for p in Path(tmp_path).iterdir() if len(p.name) == 40], "gradio left folders in TMPDIR"
    finally:
        stop_process(server)
