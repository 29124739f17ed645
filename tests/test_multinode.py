"""Several nodes through torchrun: 2 "nodes" on this machine (1 process each, gloo, a static
rendezvous on 127.0.0.1) train to the weights 1 process reaches with the same global batch,
and their steady training steps make no host sync (Lightning's DDP paths included)."""

from __future__ import annotations

import json

from launch import SyncsToFile, assert_same_weights, fit_args, free_port, last_weights, start, torchrun_node


def test_two_nodes_through_torchrun_train_like_one_process(colour_folder, tmp_path, one_process_weights):
    run, port = tmp_path / "run", free_port()
    args = fit_args(
        colour_folder, run, 8, "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
        "--trainer.log_every_n_steps", "50", SyncsToFile.arg(tmp_path),
    )
    nodes = [start(torchrun_node(rank, 2, port, *args), tmp_path / f"node{rank}.log") for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # only if one hung
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    assert_same_weights(last_weights(run), one_process_weights)
    for rank in (0, 1):
        found = json.loads((tmp_path / f"syncs-rank{rank}.json").read_text())
        assert found["steps"] >= 6 and found["syncs"] == [], found
