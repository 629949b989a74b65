from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lora_trainer.app.api import PREFIX, register
from lora_trainer.app.services import Services
from lora_trainer.safe_io import save_safetensors
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from api_client import sse_events, webhook_server

V1 = PREFIX


def make_client(services: Services, listening_remotely: bool = False) -> TestClient:
    app = FastAPI()
    register(app, services, listening_remotely)
    return TestClient(app)


@pytest.fixture
def job_services(app_settings, fake_host, fast_job_command):
    services = Services.create(app_settings, fake_host, start=True, command=fast_job_command, poll=0.05)
    yield services
    services.close()


@pytest.fixture
def client(job_services) -> TestClient:
    return make_client(job_services)


@pytest.fixture
def job_body(app_settings, make_dataset):
    checkpoint = app_settings.checkpoint_folders[0] / "base.safetensors"
    shutil.copy(TINY_MODEL_PATH, checkpoint)  # read for its kind when the job is submitted, not loaded
    return {"name": "zkchar", "options": {"pretrained_model_name_or_path": str(checkpoint),
                                          "train_data_dir": str(make_dataset()), "resolution": 64,
                                          "max_train_steps": 5}}


def wait_for(client: TestClient, job_id: int, statuses=("finished", "failed", "stopped", "paused")) -> dict:
    return polled(client, f"{V1}/jobs/{job_id}", statuses, 600)


def polled(client: TestClient, url: str, statuses, tries: int) -> dict:
    """``url``'s object once its status is one of ``statuses`` (asked every 0.05 s, ``tries`` times)."""
    for _ in range(tries):
        found = client.get(url).json()
        if found["status"] in statuses:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{url} stayed {found['status']}")


def assert_error(response, status: int, code: str | None = None, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"code", "message", "field"} and error["message"]
    if code:
        assert error["code"] == code
    if field:
        assert error["field"] == field
    return error


def test_a_lora_card_saved_with_a_bom_is_listed_with_its_fields(tmp_path):
    """Windows Notepad saves UTF-8 with a BOM: the card was read as invalid JSON and listed as null."""
    import torch
    from safetensors.torch import save_file

    from lora_trainer.app.api import lora_json

    lora = tmp_path / "星 star.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(4.0)}, str(lora), metadata={"ss_output_name": "星 star"})
    lora.with_suffix(".json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"activation text": "zkstar"}).encode("utf-8"))
    assert lora_json(lora, tmp_path)["user_metadata"] == {"activation text": "zkstar"}


# --- jobs ------------------------------------------------------------------------------------------------------


def test_a_jobs_networks_and_sample_images_are_downloaded_by_name_and_nothing_else(client, job_body, app_settings,
                                                                                   job_services):
    """An automation client on another machine got only the server's paths of what a job wrote."""
    job = client.post(f"{V1}/jobs", json=job_body).json()
    assert wait_for(client, job["id"])["status"] == "finished"
    network = client.get(f"{V1}/jobs/{job['id']}/files/zkchar.safetensors")
    assert network.status_code == 200 and network.content == (app_settings.lora_folder / "zkchar.safetensors").read_bytes()
    assert 'filename="zkchar.safetensors"' in network.headers["content-disposition"]
    sample = Path(job["folder"]) / "sample" / "zkchar_e000001_00_20261205120000_7.png"  # written relative, as the
    sample.parent.mkdir()  # trainer writes it in its working folder (the job's) under a relative output_dir
    Image.new("RGB", (8, 8)).save(sample)
    with open(Path(job["folder"]) / "events.jsonl", "a", encoding="utf-8") as events:
        events.write(json.dumps({"event": "sample", "path": f"sample/{sample.name}", "epoch": 1, "step": 5}) + "\n")
    drawn = client.get(f"{V1}/jobs/{job['id']}/files/{sample.name}")
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
    assert drawn.content == sample.read_bytes()
    # what the job did not write as a network or a sample is not served, whatever lies beside them
    (app_settings.lora_folder / "another.safetensors").write_bytes(b"x")
    for name in ("config.toml", "events.jsonl", "another.safetensors", "..%2Fconfig.toml"):
        assert client.get(f"{V1}/jobs/{job['id']}/files/{name}").status_code == 404, name
    missing = assert_error(client.get(f"{V1}/jobs/{job['id']}/files/nope.png"), 404, "file_not_found")
    assert missing["message"] == (f"job {job['id']} wrote no file named 'nope.png'; its networks and sample images: "
                                  f"zkchar.safetensors, {sample.name}")
    sample.unlink()
    gone = assert_error(client.get(f"{V1}/jobs/{job['id']}/files/{sample.name}"), 404, "file_not_found")
    assert "where it is no longer (removed since)" in gone["message"]
    assert_error(client.get(f"{V1}/jobs/999/files/zkchar.safetensors"), 404, "job_not_found")
    job_services.settings.api_credentials = {"alice": "s3cret"}  # behind the credentials, as every route
    assert client.get(f"{V1}/jobs/{job['id']}/files/zkchar.safetensors").status_code == 401
    assert client.get(f"{V1}/jobs/{job['id']}/files/zkchar.safetensors", auth=("alice", "s3cret")).status_code == 200


def test_job_runs_streams_events_and_its_file_is_listed(client, job_body, app_settings):
    created = client.post(f"{V1}/jobs", json=job_body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] in ("queued", "running") and job["options"]["output_dir"] == str(app_settings.lora_folder)
    assert job["options"]["output_name"] == "zkchar"
    assert wait_for(client, job["id"])["status"] == "finished"

    events = sse_events(client.get(f"{V1}/jobs/{job['id']}/events").text)
    assert [number for number, _ in events] == list(range(1, len(events) + 1))
    assert events[0][1]["event"] == "start" and events[-1][1]["event"] == "end"
    assert [e["step"] for _, e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]

    resumed = sse_events(client.get(f"{V1}/jobs/{job['id']}/events", headers={"Last-Event-ID": "3"}).text)
    assert [number for number, _ in resumed] == list(range(4, len(events) + 1))
    assert sse_events(client.get(f"{V1}/jobs/{job['id']}/events?after=6").text)[0][0] == 7
    # an EventSource opened with ?after=2 sends that URL again on reconnecting, with the id it last received: the
    # header wins, or every event since line 2 came again
    reconnected = client.get(f"{V1}/jobs/{job['id']}/events?after=2", headers={"Last-Event-ID": "6"})
    assert sse_events(reconnected.text)[0][0] == 7

    loras = client.get(f"{V1}/loras").json()["loras"]
    assert [lora["name"] for lora in loras] == ["zkchar"]
    assert loras[0]["metadata"]["ss_output_name"] == "zkchar" and len(loras[0]["short_hash"]) == 10
    assert loras[0]["user_metadata"]["preferred weight"] == 1.0  # the Lora card written when the job ended

    assert [j["id"] for j in client.get(f"{V1}/jobs").json()["jobs"]] == [job["id"]]
    assert client.delete(f"{V1}/jobs/{job['id']}").json() == {"deleted": job["id"]}
    assert_error(client.get(f"{V1}/jobs/{job['id']}"), 404, "job_not_found")


def test_flat_kohya_toml_sections_are_accepted(client, job_body):
    options = job_body["options"]
    body = {"name": "flat", "model_arguments": {"pretrained_model_name_or_path": options["pretrained_model_name_or_path"]},
            "dataset_arguments": {"train_data_dir": options["train_data_dir"], "resolution": 64}, "max_train_steps": 2}
    created = client.post(f"{V1}/jobs", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["options"]["max_train_steps"] == 2
    assert wait_for(client, created.json()["id"])["status"] == "finished"
    # one option given two values was the last one's, silently (sd-scripts' flattening): a client's mistake, said
    twice = {**body, "training_arguments": {"max_train_steps": 999}}
    assert "max_train_steps is given twice, as 2 and 999; keep one" in assert_error(
        client.post(f"{V1}/jobs", json=twice), 400, field="max_train_steps")["message"]
    beside = {**body, "options": {"max_train_steps": 4}}
    assert "max_train_steps is given twice, as 2 in the body and 4 in options" in assert_error(
        client.post(f"{V1}/jobs", json=beside), 400, field="max_train_steps")["message"]


def test_kohya_gui_settings_are_accepted_as_the_gui_reads_them(client, job_body, app_settings):
    """A Kohya GUI user posts the settings file as it is: its names are read as the GUI reads them, and what it
    keeps to itself comes back under warnings; a LoRA type not trained here is a 400 naming the field."""
    options = job_body["options"]
    body = {"LoRA_type": "LyCORIS/LoHa", "LyCORIS_preset": "attn-mlp", "conv_dim": 4, "conv_alpha": 2,
            "pretrained_model_name_or_path": options["pretrained_model_name_or_path"],
            "train_data_dir": options["train_data_dir"], "output_name": "gui", "optimizer": "AdamW",
            "max_resolution": "512,512", "epoch": 2, "max_train_epochs": "", "lr_warmup": 5, "text_encoder_lr": 0,
            "unet_lr": 1e-4, "sample_prompts": "zkchar, a portrait", "seed": "", "use_wandb": False}
    created = client.post(f"{V1}/jobs", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["name"], job["options"]["optimizer_type"], job["options"]["network_module"]) == ("gui", "AdamW", "lycoris.kohya")
    assert {"preset=attn-mlp", "algo=loha", "conv_dim=4"} <= set(job["options"]["network_args"])
    assert job["options"]["max_train_epochs"] == 2 and job["options"]["network_train_unet_only"] is True
    prompts = Path(job["options"]["sample_prompts"])  # the GUI keeps the text: written into the data folder
    assert prompts.is_relative_to(app_settings.data_folder) and prompts.read_text(encoding="utf-8") == "zkchar, a portrait\n"
    assert_error(client.post(f"{V1}/jobs", json={**body, "LoRA_type": "Flux1"}), 400, field="LoRA_type")
    for wrong in ("--foo 1", '--unclosed "quote'):
        assert_error(client.post(f"{V1}/jobs", json={**body, "additional_parameters": wrong}), 400,
                     field="additional_parameters")


def test_second_job_is_queued_and_state_changes(client, job_body, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.3")
    first = client.post(f"{V1}/jobs", json={**job_body, "options": {**job_body["options"], "max_train_steps": 200}}).json()
    second = client.post(f"{V1}/jobs", json={**job_body, "name": "second"}).json()
    assert wait_for(client, first["id"], ("running",))["status"] == "running"
    assert client.get(f"{V1}/jobs/{second['id']}").json()["status"] == "queued"
    assert_error(client.delete(f"{V1}/jobs/{first['id']}"), 409, "job_running")
    assert client.post(f"{V1}/jobs/{first['id']}/save").status_code == 200
    refused = assert_error(client.post(f"{V1}/jobs/{second['id']}/pause"), 409, "job_state")  # nothing to save yet
    assert refused["message"] == f"job {second['id']} is queued, not running: nothing to pause; stop takes it out of the queue"
    assert client.get(f"{V1}/jobs/{second['id']}").json()["status"] == "queued"
    assert client.post(f"{V1}/jobs/{second['id']}/stop").json()["status"] == "stopped"  # leaves the queue
    assert client.post(f"{V1}/jobs/{first['id']}/stop").status_code == 200
    assert wait_for(client, first["id"])["status"] == "stopped"
    assert_error(client.post(f"{V1}/jobs/{first['id']}/sample"), 409, "job_state")
    assert_error(client.post(f"{V1}/jobs/{first['id']}/resume"), 409, "job_state")  # the fake saved no state
    assert_error(client.post(f"{V1}/jobs/999/pause"), 404, "job_not_found")


def test_a_lora_picked_as_the_base_model_is_a_400_naming_the_field(client, job_body, app_settings):
    lora = app_settings.checkpoint_folders[0] / "a lora.safetensors"
    save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, lora)
    body = {**job_body, "options": {**job_body["options"], "pretrained_model_name_or_path": str(lora)}}
    error = assert_error(client.post(f"{V1}/jobs", json=body), 400, "invalid", "pretrained_model_name_or_path")
    assert "is not an SD1/SD2/SDXL checkpoint" in error["message"]
    assert client.get(f"{V1}/jobs").json()["jobs"] == []


def test_resume_answers_201_with_the_new_job_and_its_end_calls_the_jobs_webhook(client, job_services, job_body, tmp_path):
    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        assert wait_for(client, job["id"])["status"] == "finished"
        wait_for_calls(received, 1)
        state = tmp_path / "state"
        state.mkdir()
        for name in ("model.safetensors", "train_state.pt"):  # what a state folder holds (resuming checks for them)
            (state / name).write_bytes(b"x")
        job_services.store.update(job["id"], status="paused", last_state=str(state))
        resumed = client.post(f"{V1}/jobs/{job['id']}/resume")
        assert resumed.status_code == 201, resumed.text
        assert resumed.json()["resumed_from"] == job["id"] and resumed.json()["options"]["resume"] == str(state)
        assert wait_for(client, resumed.json()["id"])["status"] == "finished"
        wait_for_calls(received, 2)
    assert [call["job"]["id"] for call in received] == [job["id"], resumed.json()["id"]]


def test_a_job_whose_state_a_queued_job_resumes_from_cannot_be_deleted(client, job_services, job_body, tmp_path,
                                                                        monkeypatch):
    """Deleting it removes its folder, where its state is: the queued job would fail with 'no such folder'."""
    paused = client.post(f"{V1}/jobs", json=job_body).json()
    assert wait_for(client, paused["id"])["status"] == "finished"
    state = tmp_path / "state"
    state.mkdir()
    for name in ("model.safetensors", "train_state.pt"):
        (state / name).write_bytes(b"x")
    job_services.store.update(paused["id"], status="paused", last_state=str(state))
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.3")
    blocker = client.post(f"{V1}/jobs", json={**job_body, "name": "blocker",
                                               "options": {**job_body["options"], "max_train_steps": 200}}).json()
    assert wait_for(client, blocker["id"], ("running",))["status"] == "running"
    resumed = client.post(f"{V1}/jobs/{paused['id']}/resume").json()
    error = assert_error(client.delete(f"{V1}/jobs/{paused['id']}"), 409, "job_running")
    assert error["message"].startswith(f"job {resumed['id']} resumes from job {paused['id']}'s saved state")
    assert client.post(f"{V1}/jobs/{resumed['id']}/stop").json()["status"] == "stopped"  # out of the queue
    assert client.delete(f"{V1}/jobs/{paused['id']}").json() == {"deleted": paused["id"]}
    client.post(f"{V1}/jobs/{blocker['id']}/stop")
    wait_for(client, blocker["id"])


@pytest.mark.parametrize("change, status, field", [
    ({"name": "a/b"}, 400, "name"),
    ({"name": ".."}, 400, "name"),
    ({"name": "ok", "options": {"output_name": "../x"}}, 400, "output_name"),
    ({"options": {"learning_rat": 1e-4}}, 400, "learning_rat"),
    ({"options": {"learning_rate": "abc"}}, 400, "learning_rate"),
    ({"options": {"learning_rate": -1}}, 400, "learning_rate"),
    ({"options": {"text_encoder_lr": [1e-4, -1e-5]}}, 400, "text_encoder_lr"),
    ({"options": {"optimizer_type": "AdamX"}}, 400, "optimizer_type"),  # not only once the job has started
    ({"options": {"mixed_precision": "fp32"}}, 400, "mixed_precision"),
    ({"options": {"max_train_epochs": -3}}, 400, "max_train_epochs"),  # not a run that saves an untrained file
    ({"options": {"backend": "sd-scripts=/tmp/anything"}}, 400, "backend"),  # would run that folder's train_network.py
    ({"options": {"events_file": "/tmp/x"}}, 400, "events_file"),
    ({"options": {"state_dir": "/tmp/x"}}, 400, "state_dir"),  # a path the client could write anywhere
    ({"webhook": "file:///etc/passwd"}, 400, "webhook"),
    ({"options": {"train_data_dir": "../../../../etc"}}, 403, "train_data_dir"),
    ({"options": {"train_data_dir": "/etc"}}, 403, "train_data_dir"),
    ({"options": {"output_dir": "/tmp/elsewhere"}}, 403, "output_dir"),
    ({"options": {"network_weights": "/etc/passwd"}}, 403, "network_weights"),
    ({"options": {"base_weights": ["/etc/passwd"]}}, 403, "base_weights"),
    ({"options": {"metadata_thumbnail": "/etc/passwd"}}, 403, "metadata_thumbnail"),  # read into the file's metadata
    # "data:" starts a data URL only for the thumbnail, and only with a media type: else it is a folder's name
    ({"options": {"output_dir": "data:/../../../../../../../../tmp/elsewhere"}}, 403, "output_dir"),
    ({"options": {"output_dir": "data:image/png;base64,AAAA"}}, 403, "output_dir"),
    ({"options": {"dataset_config": "data:/../../../../../../../../etc/hostname"}}, 403, "dataset_config"),
    ({"options": {"metadata_thumbnail": "data:/../../../../../../../../etc/passwd"}}, 403, "metadata_thumbnail"),
    ({"options": {"network_module": "lycoris.kohya", "network_args": ["preset=/etc/preset.toml"]}}, 403, "network_args"),
    ({"options": {"network_module": "lycoris.kohya", "network_args": ["preset=presets/mine.toml"]}}, 400, "network_args"),
    # a value of another kind: refused by name, not a 500 now or a failed (or silently different) run later
    ({"options": {"learning_rate": [1e-4]}}, 400, "learning_rate"),
    ({"options": {"network_dim": [4]}}, 400, "network_dim"),
    ({"options": {"noise_offset": [0.1]}}, 400, "noise_offset"),
    ({"options": {"clip_skip": [2]}}, 400, "clip_skip"),
    ({"options": {"optimizer_type": 5}}, 400, "optimizer_type"),
    ({"options": {"network_args": ["conv_dim=4", True]}}, 400, "network_args"),
    ({"options": {"flip_aug": "false"}}, 400, "flip_aug"),  # a switch that would have been on
    ({"options": {"network_args": {"conv_dim": 4}}}, 400, "network_args"),  # not flattened as a section
    ({"options": {"min_snr_gamma": {}}}, 400, "min_snr_gamma"),  # not an empty section that drops the option
    ({"options": {"max_train_steps": 1e30}}, 400, "max_train_steps"),
    ({"options": {"resolution": "100000000"}}, 400, "resolution"),
    ({"options": {"max_train_epochs": 10**12}}, 400, "max_train_epochs"),  # 4e13 steps, and names of 6 digits
])
def test_bad_jobs_are_refused_before_queueing(client, job_body, change, status, field):
    body = {**job_body, **{k: v for k, v in change.items() if k != "options"},
            "options": {**job_body["options"], **change.get("options", {})}}
    assert_error(client.post(f"{V1}/jobs", json=body), status, field=field)
    assert client.get(f"{V1}/jobs").json()["jobs"] == []


def test_a_job_whose_run_would_fail_at_its_dataset_is_refused_not_queued(client, job_body, app_settings):
    """No --resolution, or a folder without <repeats>_<name> subfolders: a 400 now, not a job that fails as it starts."""
    options = {k: v for k, v in job_body["options"].items() if k != "resolution"}
    error = assert_error(client.post(f"{V1}/jobs", json={**job_body, "options": options}), 400, field="resolution")
    assert "no --resolution; give the training size" in error["message"]
    flat = app_settings.dataset_roots[0] / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    body = {**job_body, "options": {**job_body["options"], "train_data_dir": str(flat)}}
    assert "move them into a subfolder such as" in assert_error(client.post(f"{V1}/jobs", json=body), 400)["message"]
    # caption files the run could not read (not UTF-8): a 400 naming them now, not a job failing behind another later
    dataset = Path(job_body["options"]["train_data_dir"])
    for image in sorted(dataset.rglob("*.png"))[:2]:
        image.with_suffix(".caption").write_bytes("红色的星星".encode("gbk"))  # sd-scripts' default extension
    error = assert_error(client.post(f"{V1}/jobs", json=job_body), 400, field="train_data_dir")
    assert "is not UTF-8" in error["message"] and "(1 more caption files cannot be read either)" in error["message"]
    assert client.get(f"{V1}/jobs").json()["jobs"] == []


def test_a_thumbnail_given_as_a_data_url_is_no_path(client, job_body):
    body = {**job_body, "options": {**job_body["options"], "metadata_thumbnail": "data:image/png;base64,iVBORw0KGgo="}}
    response = client.post(f"{V1}/jobs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["options"]["metadata_thumbnail"] == "data:image/png;base64,iVBORw0KGgo="


def test_empty_paths_in_a_body_mean_not_given(client, job_body):
    """A Kohya-TOML-like body often carries vae = "" or network_weights = "": not the server's current folder."""
    body = {**job_body, "options": {**job_body["options"], "vae": "", "network_weights": "", "sample_prompts": ""}}
    response = client.post(f"{V1}/jobs", json=body)
    assert response.status_code in (200, 201, 202), response.text
    job = client.get(f"{V1}/jobs").json()["jobs"][0]
    assert not {"vae", "network_weights", "sample_prompts"} & set(job.get("options", {}))


def test_symlink_out_of_a_root_is_refused(client, job_body, app_settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = app_settings.dataset_roots[0] / "innocent"
    link.symlink_to(outside)
    body = {**job_body, "options": {**job_body["options"], "train_data_dir": str(link)}}
    error = assert_error(client.post(f"{V1}/jobs", json=body), 403, "path_not_allowed", "train_data_dir")
    assert "outside the allowed folders" in error["message"]


def test_invalid_options_answer_400_with_options_from_message(client, job_body):
    body = {**job_body, "options": {**job_body["options"], "full_fp16": True}}
    assert "--full_fp16 needs --mixed_precision fp16" in assert_error(client.post(f"{V1}/jobs", json=body), 400)["message"]


def test_bodies_and_ids_json_cannot_hold_are_refused_not_stored(client, job_body):
    """NaN/Infinity (Python's parser takes them), a body nested beyond the parser, an id beyond SQLite's integers,
    a negative event id: each a clear answer, nothing queued, and the job list still readable."""
    text = json.dumps(job_body).replace('"max_train_steps": 5', '"max_train_steps": 5, "learning_rate": NaN')
    error = assert_error(client.post(f"{V1}/jobs", content=text, headers={"Content-Type": "application/json"}), 400,
                         "invalid_json")
    assert "NaN is not a JSON number" in error["message"]
    deep = "[" * 100_000 + "]" * 100_000
    assert_error(client.post(f"{V1}/jobs", content=deep, headers={"Content-Type": "application/json"}), 400, "invalid_json")
    assert client.get(f"{V1}/jobs").json()["jobs"] == []
    assert_error(client.get(f"{V1}/jobs/99999999999999999999999"), 404, "job_not_found")
    assert_error(client.get(f"{V1}/no-such-thing"), 404, "not_found")  # the error shape, not FastAPI's {"detail"}
    assert_error(client.delete(f"{V1}/datasets/zzz"), 404, "session_not_found")
    job = client.post(f"{V1}/jobs", json=job_body).json()
    wait_for(client, job["id"])
    assert "data:" in client.get(f"{V1}/jobs/{job['id']}/events", params={"after": -3}).text  # from the start


def test_body_too_large_and_not_json(job_services):
    job_services.settings.max_body_bytes = 100
    client = make_client(job_services)
    assert_error(client.post(f"{V1}/jobs", json={"name": "x" * 200}), 413, "body_too_large")
    assert_error(client.post(f"{V1}/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json")


def wait_for_calls(received: list, count: int) -> list:
    for _ in range(200):
        if len(received) >= count:
            break
        time.sleep(0.05)
    return received


def test_webhook_gets_the_summary_when_the_job_ends(client, job_body):
    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        assert job["webhook"] is True and url not in json.dumps(client.get(f"{V1}/jobs").json())
        wait_for(client, job["id"])
        wait_for_calls(received, 1)
    assert received[0]["job"]["id"] == job["id"] and received[0]["job"]["status"] == "finished"
    assert received[0]["end"]["files"][0].endswith("zkchar.safetensors")
    plain = client.post(f"{V1}/jobs", json=job_body).json()
    assert plain["webhook"] is False
    wait_for(client, plain["id"])


def test_deleting_a_queued_job_calls_its_webhook_once_as_a_stop_from_the_queue(services, job_body):
    """DELETE of a job that had not started said nothing to its webhook: a client waiting on it waited for good."""
    client = make_client(services)  # the runner is not started: the job stays queued
    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        assert client.delete(f"{V1}/jobs/{job['id']}").json() == {"deleted": job["id"]}
        wait_for_calls(received, 1)
        time.sleep(1.2)  # the job's watcher polls every 0.5 s: it must not call a second time
    assert len(received) == 1, received
    assert set(received[0]) == {"job", "end"}  # the shape an ended job's call has
    assert received[0]["job"]["id"] == job["id"] and received[0]["job"]["status"] == "stopped"
    assert received[0]["job"]["message"] == "removed from the queue"
    assert received[0]["end"]["stopped"] is True and received[0]["end"]["files"] == []
    assert_error(client.get(f"{V1}/jobs/{job['id']}"), 404, "job_not_found")


def test_a_job_a_stop_took_out_of_the_queue_just_before_its_delete_is_deleted_and_its_end_sent_once(services, job_body,
                                                                                                  monkeypatch):
    """The stop's watcher would see the job gone: the DELETE sends its end. It answered 'has just started; stop it
    first' about a job no longer there."""
    client = make_client(services)
    dequeue = services.runner.dequeue

    def taken_by_a_stop(job_id):
        services.runner.stop(job_id)  # just before this DELETE's own take-out
        dequeue(job_id)

    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        monkeypatch.setattr(services.runner, "dequeue", taken_by_a_stop)
        assert client.delete(f"{V1}/jobs/{job['id']}").json() == {"deleted": job["id"]}
        wait_for_calls(received, 1)
        time.sleep(1.2)  # the watcher polls every 0.5 s
    assert [call["job"]["status"] for call in received] == ["stopped"]
    assert_error(client.delete(f"{V1}/jobs/{job['id']}"), 404, "job_not_found")


def test_a_job_deleted_right_after_its_stop_has_its_end_sent_once(services, job_body):
    """The DELETE came within the watcher's 0.5 s poll: it took the end for the watcher's to send, and the watcher
    found the job gone. The client waited for good."""
    client = make_client(services)  # the runner is not started: the stop takes the job out of the queue
    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        assert client.post(f"{V1}/jobs/{job['id']}/stop").json()["status"] == "stopped"
        assert client.delete(f"{V1}/jobs/{job['id']}").json() == {"deleted": job["id"]}
        wait_for_calls(received, 1)
        time.sleep(1.2)  # the watcher polls every 0.5 s: it must not call a second time
    assert [(call["job"]["id"], call["job"]["status"], call["end"]["stopped"]) for call in received] == [
        (job["id"], "stopped", True)]


def test_a_watcher_that_finds_the_jobs_events_gone_sends_the_end_once_without_a_traceback(services, job_body,
                                                                                           monkeypatch):
    """A DELETE that claimed the call removes the folder while the watcher reads the end: the watcher's thread died
    with "Exception in thread lora-trainer-webhook-N" in the server log. A job whose events cannot be read still has
    its end sent (without the end event) by whoever claims it."""
    import threading

    from lora_trainer.app import api

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: crashed.append(hook.exc_value))
    monkeypatch.setattr(api, "last_end_event", lambda job: (_ for _ in ()).throw(FileNotFoundError(2, "gone")))
    client = make_client(services)
    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        assert client.post(f"{V1}/jobs/{job['id']}/stop").json()["status"] == "stopped"
        wait_for_calls(received, 1)
        time.sleep(1.2)
    assert crashed == [] and [(c["job"]["status"], c["end"]) for c in received] == [("stopped", None)]


def test_after_a_reload_a_jobs_end_is_sent_once(app_settings, fake_host, job_body):
    """"Reload UI" makes new Services that watch the job again while the old watcher still polls: both sent it."""
    with webhook_server() as (url, received):
        old = Services.create(app_settings, fake_host, start=False)
        job = make_client(old).post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        old.close()
        new = Services.create(app_settings, fake_host, start=False)
        client = make_client(new)  # registering the routes watches the jobs that wait for a webhook again
        assert client.post(f"{V1}/jobs/{job['id']}/stop").json()["status"] == "stopped"
        wait_for_calls(received, 1)
        time.sleep(1.2)
        new.close()
    assert len(received) == 1 and client.get(f"{V1}/jobs/{job['id']}").json()["webhook"] is True


def test_a_jobs_end_is_sent_once_however_many_watch_it_and_not_again_when_it_is_deleted(app_settings, fake_host,
                                                                                        job_body):
    """Two Services on one data folder (a reload whose old one still runs, a second app) both watch the job; an ended
    job's DELETE, weeks later, sent its end a second time."""
    with webhook_server() as (url, received):
        first = Services.create(app_settings, fake_host, start=False)
        client = make_client(first)
        job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
        second = Services.create(app_settings, fake_host, start=False)
        make_client(second)  # registering the routes watches the jobs that wait for a webhook
        assert client.post(f"{V1}/jobs/{job['id']}/stop").json()["status"] == "stopped"
        wait_for_calls(received, 1)
        time.sleep(1.2)
        assert client.delete(f"{V1}/jobs/{job['id']}").status_code == 200
        time.sleep(0.5)
        first.close()
        second.close()
    assert len(received) == 1


def test_a_job_that_ended_while_the_app_was_closed_has_its_end_sent_at_the_next_start(app_settings, fake_host,
                                                                                      job_body):
    """The trainer trains on after the app closes; it finished unheard, and at the next start the job was marked
    finished without a word to its webhook: the client waited for good."""
    import subprocess
    import sys

    from lora_trainer.jobs.store import JobStore
    from lora_trainer.training.events import EventLog

    store = JobStore(app_settings.jobs_database, app_settings.jobs_folder)
    job = store.add("unheard", {})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.update(job.id, status="running", pid=gone.pid, started=time.time())
    with EventLog(job.events_path) as events:  # what the trainer said while nobody followed it
        events.emit("start")
        events.emit("end", files=[], steps=5, stopped=False)
    with webhook_server() as (url, received):
        (job.folder / "webhook.url").write_text(url, encoding="utf-8")
        services = Services.create(app_settings, fake_host, start=False)
        make_client(services)
        again = Services.create(app_settings, fake_host, start=False)  # a second start: sent once only
        make_client(again)
        wait_for_calls(received, 1)
        time.sleep(0.5)
        services.close()
        again.close()
    assert [(call["job"]["id"], call["job"]["status"], call["end"]["steps"]) for call in received] == [
        (job.id, "finished", 5)]


def test_deleting_a_job_that_ended_under_an_earlier_version_does_not_send_its_end_again(services, job_body):
    """Earlier versions left webhook.url after calling it: its DELETE, weeks later, sent the end a second time."""
    client = make_client(services)
    with webhook_server() as (url, received):
        job = client.post(f"{V1}/jobs", json=job_body).json()
        services.store.update(job["id"], status="finished", finished=time.time())  # ended then, its end sent then
        (Path(job["folder"]) / "webhook.url").write_text(url, encoding="utf-8")  # and the file kept
        assert client.delete(f"{V1}/jobs/{job['id']}").status_code == 200
        time.sleep(1.2)
    assert received == []


def test_a_job_folder_left_by_an_earlier_database_brings_no_webhook(app_settings, fake_host, job_body):
    """Only jobs.sqlite removed, jobs/ kept: job 1's folder is reused, and its old webhook file made the new job say
    it had one (and a resume of it send to the old receiver)."""
    services = Services.create(app_settings, fake_host, start=False)
    client = make_client(services)
    folder = app_settings.data_folder / "jobs" / "job-00001"
    folder.mkdir(parents=True)
    (folder / "webhook.called").write_text("http://127.0.0.1:9/old-receiver", encoding="utf-8")
    job = client.post(f"{V1}/jobs", json=job_body).json()
    assert job["folder"] == str(folder) and job["webhook"] is False
    services.close()


def test_a_job_of_a_new_database_gets_its_webhook_though_an_old_job_had_its_number(app_settings, fake_host, job_body):
    """The data folder wiped and the app reloaded in one process: job 1 again, whose webhook was taken for called."""
    with webhook_server() as (url, received):
        for calls in (1, 2):
            services = Services.create(app_settings, fake_host, start=False)
            client = make_client(services)
            job = client.post(f"{V1}/jobs", json={**job_body, "webhook": url}).json()
            assert job["id"] == 1 and client.delete(f"{V1}/jobs/1").status_code == 200
            wait_for_calls(received, calls)
            services.close()
            for watcher in [t for t in threading.enumerate() if t.name == "lora-trainer-webhook-1"]:
                watcher.join(timeout=5)  # it sees the job gone at its next poll; reading on, it made the file again
            services.store.database.unlink()
    assert len(received) == 2


def test_unreachable_webhook_does_not_affect_the_job(client, job_body):
    job = client.post(f"{V1}/jobs", json={**job_body, "webhook": "http://127.0.0.1:9/nothing-listens"}).json()
    assert wait_for(client, job["id"])["status"] == "finished"


# --- auth ------------------------------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_with_api_credentials(services):
    services.settings.api_credentials = {"alice": "s3cret"}
    client = make_client(services, listening_remotely=True)
    assert_error(client.get(f"{V1}/jobs"), 401, "unauthorized")
    assert client.get(f"{V1}/jobs").headers["WWW-Authenticate"] == "Basic"
    assert_error(client.get(f"{V1}/jobs", headers=basic("alice", "wrong")), 401)
    assert_error(client.get(f"{V1}/jobs", headers=basic("bob", "s3cret")), 401)
    assert client.get(f"{V1}/jobs", headers=basic("alice", "s3cret")).status_code == 200


def test_the_standalone_pages_on_the_network_ask_for_the_same_credentials(services):
    """The tabs read and write files as the API does: on the network the pages and the UI's websocket need the
    --api-auth credentials too (they were open to anyone)."""
    from starlette.websockets import WebSocketDisconnect

    from lora_trainer.app.standalone import create_app

    services.settings.api_credentials = {"alice": "s3cret"}
    client = TestClient(create_app(services, listening_remotely=True))
    page = client.get("/")
    assert page.status_code == 401 and page.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/", headers=basic("alice", "wrong")).status_code == 401
    assert client.get("/", headers=basic("alice", "s3cret")).status_code == 200
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/queue/join") as socket:
            socket.receive_text()
    assert_error(client.get(f"{V1}/jobs"), 401, "unauthorized")  # the API keeps its own error shape
    services.settings.api_credentials = {}
    assert "--api-auth" in client.get("/").text and client.get("/").status_code == 403
    services.settings.allow_unauthenticated_remote = True
    assert client.get("/").status_code == 200
    assert TestClient(create_app(services, listening_remotely=False)).get("/").status_code == 200


def test_the_startup_warning_names_what_answers_403_on_the_network_without_credentials(services, caplog):
    """The standalone app refuses its pages too (the WebUI's pages are the WebUI's): the warning named the API only,
    and the user looked for the cause of a 403 page elsewhere."""
    from lora_trainer.app.standalone import create_app

    create_app(services, listening_remotely=True)
    assert "the pages and the API (/lora-trainer/v1) answer 403" in caplog.text
    caplog.clear()
    make_client(services, listening_remotely=True)  # the WebUI's registration
    assert "the API at /lora-trainer/v1 answers 403" in caplog.text and "pages" not in caplog.text


def test_remote_without_credentials_is_refused_unless_allowed(services):
    client = make_client(services, listening_remotely=True)
    error = assert_error(client.get(f"{V1}/loras"), 403, "auth_required")
    # the standalone app has no Settings page: its own switch is named too
    assert "--api-auth" in error["message"] and "--allow-unauthenticated" in error["message"]
    assert_error(client.post(f"{V1}/dataset/check", json={"path": "/"}), 403, "auth_required")
    services.settings.allow_unauthenticated_remote = True
    assert client.get(f"{V1}/loras").status_code == 200
    assert make_client(services, listening_remotely=False).get(f"{V1}/loras").status_code == 200


def test_openapi_documents_every_route_with_examples(services):
    schema = make_client(services).get("/openapi.json").json()
    operations = [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]
    assert all(path.startswith(V1) for path, _, _ in operations)
    assert {"/jobs", "/jobs/{job_id}/events", "/loras", "/dataset/check", "/datasets/open", "/datasets/{session_id}/edit",
            "/datasets/{session_id}/backups", "/datasets/{session_id}/restore", "/datasets/{session_id}/revert", "/grids",
            "/grids/{grid_id}/image", "/grids/{grid_id}/stop"} <= {path[len(V1):] for path, _, _ in operations}
    for path, method, op in operations:
        assert op.get("summary") and op.get("description"), (method, path)
        if method == "post" and "requestBody" in op:
            assert op["requestBody"]["content"]["application/json"]["examples"], path
    body_of = lambda p: schema["paths"][V1 + p]["post"]["requestBody"]["content"]["application/json"]
    assert body_of("/jobs")["examples"]["options"]["value"]["options"]["network_dim"] == 16
    assert "op" in body_of("/datasets/{session_id}/edit")["schema"]["required"]


# --- datasets --------------------------------------------------------------------------------------------------


def test_dataset_check_returns_the_health_report(services, make_dataset):
    client = make_client(services)
    body = {"path": str(make_dataset(count=3)), "resolution": 64, "min_bucket_reso": 64, "trigger": "zkchar"}
    report = client.post(f"{V1}/dataset/check", json=body)
    assert report.status_code == 200, report.text
    data = report.json()
    assert data["concept_folders"][0]["image_count"] == 3 and data["concept_folders"][0]["repeats"] == 10
    assert ["zkchar", 3] in data["tag_frequency"] and data["settings"]["resolution"] == [64, 64]
    contradicting = assert_error(client.post(f"{V1}/dataset/check", json={**body, "min_bucket_reso": 256}), 400,
                                 field="min_bucket_reso")  # the field to change, also when it was left at its default
    assert "min_bucket_reso 256 is larger than the shorter side of the resolution 64x64" in contradicting["message"]
    assert_error(client.post(f"{V1}/dataset/check", json={"path": "/etc"}), 403, field="path")
    for wrong, field in (({"resolution": "abc"}, "resolution"), ({"resolution": [64, 0]}, "resolution"),
                         ({"batch_size": "2"}, "batch_size"), ({"enable_bucket": 1}, "enable_bucket"),
                         # a typo's bucket list would take the server's memory and minutes to refuse
                         ({"resolution": 100000000}, "resolution"), ({"max_bucket_reso": 10**9}, "max_bucket_reso")):
        assert_error(client.post(f"{V1}/dataset/check", json={**body, **wrong}), 400, field=field)
    assert client.post(f"{V1}/dataset/check", json={**body, "resolution": "64,64"}).status_code == 200
    # bucket limits left out follow the resolution, as a job at 64 px trains without naming them
    small = {key: value for key, value in body.items() if key != "min_bucket_reso"}
    assert client.post(f"{V1}/dataset/check", json=small).json()["settings"]["min_bucket_reso"] == 64
    assert client.post(f"{V1}/dataset/check", json={**small, "resolution": 2048}).json()["settings"]["max_bucket_reso"] == 2048
    assert_error(client.post(f"{V1}/dataset/check", json={"path": str(services.settings.dataset_roots[0] / "nope")}), 400, "not_found")
    # buckets off, the 16x16 images are larger than 16x8: an error unless the run crops them or caches latents
    fixed = {**small, "resolution": "16,8", "enable_bucket": False}
    assert "wrong-size" in [f["kind"] for f in client.post(f"{V1}/dataset/check", json=fixed).json()["findings"]]
    for setting in ("random_crop", "cache_latents"):
        checked = client.post(f"{V1}/dataset/check", json={**fixed, setting: True}).json()
        assert "wrong-size" not in [f["kind"] for f in checked["findings"]] and checked["settings"][setting]
    # a face crop cuts around the face its name gives (sd-scripts' name_<cx>_<cy>_<w>_<h>): those alone fit
    concept = Path(body["path"]) / "10_zkchar"
    (concept / "img_000.png").rename(concept / "img_000_8_8_4_4.png")
    checked = client.post(f"{V1}/dataset/check", json={**fixed, "face_crop": True}).json()
    assert sorted(f["path"] for f in checked["findings"] if f["kind"] == "wrong-size") == [
        "10_zkchar/img_001.png", "10_zkchar/img_002.png"]


def test_a_tag_session_with_file_names_that_are_not_utf8_answers_and_takes_them_back(services, make_dataset):
    """GBK bytes unpacked on Linux: every page listing such a name answered 500 (JSON text cannot be UTF-8 there)."""
    import os

    client = make_client(services)
    folder = make_dataset(count=2) / "10_zkchar"
    gbk = os.fsdecode("星".encode("gbk"))
    try:
        (folder / "img_001.png").rename(folder / f"{gbk}.png")
        (folder / "img_001.txt").rename(folder / f"{gbk}.txt")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    opened = client.post(f"{V1}/datasets/open", json={"path": str(folder)})
    assert opened.status_code == 201, opened.text
    names = [image["name"] for image in opened.json()["images"]]
    assert f"{gbk}.png" in names  # the JSON escape \udcd0… reads back as the name Python gave
    sid = opened.json()["session"]
    edited = client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": "gbk", "selection": [f"{gbk}.png"]})
    assert edited.status_code == 200, edited.text
    assert client.post(f"{V1}/datasets/{sid}/save", json={}).status_code == 200
    assert (folder / f"{gbk}.txt").read_text(encoding="utf-8").endswith("gbk")


def test_tag_session_edit_filter_undo_redo_save(services, make_dataset):
    client = make_client(services)
    folder = make_dataset(count=5) / "10_zkchar"
    assert_error(client.post(f"{V1}/datasets/open", json={"path": str(folder), "recursive": "maybe"}), 400, field="recursive")
    assert_error(client.post(f"{V1}/datasets/open", json={"path": str(folder), "caption_extension": 5}), 400,
                 field="caption_extension")
    assert_error(client.post(f"{V1}/datasets/open", json={"path": str(folder), "caption_extension": ".png"}), 400,
                 field="caption_extension")
    assert_error(client.post(f"{V1}/datasets/open", json={}), 400, field="path")
    opened = client.post(f"{V1}/datasets/open", json={"path": str(folder)})
    assert opened.status_code == 201, opened.text
    sid = opened.json()["session"]
    assert opened.json()["total"] == 5 and ["zkchar", 5] in opened.json()["tag_frequency"] and "note" not in opened.json()
    # the Kohya training folder above it: no image of its own, and the answer says where they are
    train = client.post(f"{V1}/datasets/open", json={"path": str(folder.parent)}).json()
    assert train["total"] == 0 and "its sub-folders hold some (10_zkchar)" in train["note"]
    assert "note" not in client.post(f"{V1}/datasets/open", json={"path": str(folder.parent), "recursive": True}).json()
    (folder / "gone.png").symlink_to(folder / "not-there.png")  # a drive not mounted: said, not silently missing
    note = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()["note"]
    assert note.startswith("Not shown: gone.png links to a file that is not there") and note.count("..") == 0
    (folder / "gone.png").unlink()

    page = client.get(f"{V1}/datasets/{sid}", params={"all": "blue", "page_size": 1, "page": 2}).json()
    assert page["filtered"] == 2 and page["pages"] == 2 and [i["name"] for i in page["images"]] == ["img_003.png"]
    edited = client.post(f"{V1}/datasets/{sid}/edit", json={"op": "replace", "find": "circle", "replacement": "ring"}).json()
    assert edited["history"]["undo"] == ["Replace text 'circle' with 'ring'"] and edited["unsaved"] == 2
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "move_first", "tags": ["blue"], "selection": ["img_001.png"]})
    assert client.post(f"{V1}/datasets/{sid}/undo").json()["history"]["redo"] == ["Move blue to the front"]
    assert client.post(f"{V1}/datasets/{sid}/redo").json()["history"]["redo"] == []
    assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["x"], "selection": ["../../etc/passwd"]}),
                 400, field="selection")
    for names in ([1], [None], [["img_000.png"]]):  # not names: a 400, never a 500
        assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["x"], "selection": names}),
                     400, field="selection")
    assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "nuke"}), 400, "invalid", field="op")
    for bad, field in (([1], "filter"), ("zkchar", "filter"), (5, "filter"), ({"untagged": "false"}, "filter.untagged")):
        assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["x"], "filter": bad}), 400,
                     field=field)  # a 500, a list of letters as unknown keys, or "false" read as true
    assert_error(client.get(f"{V1}/datasets/{sid}", params={"untagged": "maybe"}), 400, field="untagged")
    assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["x"], "filter": {"regex": "(("}}),
                 400, field="filter.regex")
    assert_error(client.get(f"{V1}/datasets/{sid}", params={"page_size": 0}), 400, field="page_size")
    limited = client.get(f"{V1}/datasets/{sid}", params={"reset": "true", "tag_limit": 2}).json()
    assert limited["tag_frequency"] == [["zkchar", 5], ["red", 3]] and limited["tag_frequency_total"] == 5
    assert limited["filtered_tag_frequency_total"] == 5 and len(limited["filtered_tag_frequency"]) == 2
    assert "whole number, not 'all'" in assert_error(client.get(f"{V1}/datasets/{sid}", params={"tag_limit": "all"}), 400,
                                                     field="tag_limit")["message"]
    assert_error(client.get(f"{V1}/datasets/{sid}/image", params={"name": "nope.png"}), 400, field="name")
    wrong = assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["x"], "position": "first"}),
                         400, field="position")
    assert "position must be a whole number or null" in wrong["message"]
    assert "needs tags; it takes tags, position" in assert_error(
        client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add"}), 400, field="tags")["message"]
    assert assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "dedupe", "keep": 1}), 400,
                        field="keep")["message"].startswith("Tag edit 'dedupe' has no parameter 'keep'")

    (folder / "img_003.txt").write_text("changed, elsewhere", encoding="utf-8")
    conflict = assert_error(client.post(f"{V1}/datasets/{sid}/save", json={}), 409, "save_conflict")
    assert_error(client.post(f"{V1}/datasets/{sid}/save", json={"overwrite_changed": "yes"}), 400, field="overwrite_changed")
    assert conflict["conflicts"] == ["img_003.png"]
    saved = client.post(f"{V1}/datasets/{sid}/save", json={"overwrite_changed": True}).json()
    assert sorted(saved["written"]) == ["img_001.txt", "img_003.txt"]
    assert (folder / "img_001.txt").read_text(encoding="utf-8") == "blue, zkchar, ring"
    assert (folder / "img_003.txt").read_text(encoding="utf-8") == "zkchar, blue, ring"

    image = client.get(f"{V1}/datasets/{sid}/image", params={"name": "img_000.png"})
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    assert client.delete(f"{V1}/datasets/{sid}").status_code == 200
    assert_error(client.get(f"{V1}/datasets/{sid}"), 404, "session_not_found")


def test_a_tag_session_lists_its_folders_backups_and_restores_one_by_name(services, make_dataset):
    client = make_client(services)
    folder = make_dataset(count=4) / "10_zkchar"
    sid = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()["session"]
    assert client.get(f"{V1}/datasets/{sid}/backups").json() == {"backups": []}
    assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={}), 400, "not_found", field="backup")
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "replace", "find": "red", "replacement": "crimson"})
    saved = client.post(f"{V1}/datasets/{sid}/save", json={}).json()
    (backup,) = client.get(f"{V1}/datasets/{sid}/backups").json()["backups"]
    assert backup["name"] == Path(saved["backup_folder"]).name and (backup["captions"], backup["created"]) == (2, 0)
    assert backup["time"].replace("T", "_").replace(":", "-") == backup["name"][:19]  # ISO 8601, the name's time

    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["solo"], "selection": ["img_001.png"]})
    assert "save or undo them first" in assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={}), 409,
                                                      "unsaved_edits")["message"]
    client.post(f"{V1}/datasets/{sid}/undo")
    for name in ("../../..", "../10_zkchar", "/etc", "..\\.."):
        assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={"backup": name}), 400, "invalid", field="backup")
    assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={"backup": "2020-01-01_00-00-00"}), 400, "not_found",
                 field="backup")
    assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={"backup": 5}), 400, "invalid", field="backup")
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, crimson, square"  # none of those restored

    restored = client.post(f"{V1}/datasets/{sid}/restore", json={"backup": backup["name"]})
    assert restored.status_code == 200, restored.text
    assert sorted(restored.json()["restored"]) == ["img_000.txt", "img_002.txt"] and restored.json()["removed"] == []
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, red, square"
    assert ["red", 2] in client.get(f"{V1}/datasets/{sid}").json()["tag_frequency"]  # the session read it again
    newest = client.get(f"{V1}/datasets/{sid}/backups").json()["backups"]
    assert [b["name"] for b in newest] == [restored.json()["undo_backup"], backup["name"]]
    assert client.post(f"{V1}/datasets/{sid}/restore").status_code == 200  # no body: the newest, undoing the restore
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, crimson, square"
    assert_error(client.get(f"{V1}/datasets/zzz/backups"), 404, "session_not_found")


def test_revert_discards_unsaved_edits_taking_the_other_programs_caption_after_a_reload_conflict(services,
                                                                                                 make_dataset):
    client = make_client(services)
    folder = make_dataset(count=4) / "10_zkchar"
    sid = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()["session"]
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["solo"], "selection": "all"})
    (folder / "img_001.txt").write_text("zkchar, blue, circle, smile", encoding="utf-8")  # a tagger, meanwhile
    assert client.post(f"{V1}/datasets/{sid}/reload").json()["conflicts"] == ["img_001.png"]

    reverted = client.post(f"{V1}/datasets/{sid}/revert", json={"selection": ["img_001.png"]})
    assert reverted.status_code == 200, reverted.text
    page = reverted.json()
    assert page["reverted"] == ["img_001.png"] and page["unsaved"] == 3
    assert page["images"][1] == {"name": "img_001.png", "tags": ["zkchar", "blue", "circle", "smile"], "unsaved": False}
    assert page["history"]["undo"][-1] == "Revert to the saved captions"
    undone = client.post(f"{V1}/datasets/{sid}/undo").json()
    assert undone["images"][1]["tags"] == ["zkchar", "blue", "circle", "solo"] and undone["unsaved"] == 4

    assert client.get(f"{V1}/datasets/{sid}", params={"all": "blue"}).status_code == 200  # a filter: 001, 003
    everything = client.post(f"{V1}/datasets/{sid}/revert", json={"selection": None}).json()  # null: every image
    assert everything["reverted"] == ["img_000.png", "img_001.png", "img_002.png", "img_003.png"]
    assert everything["unsaved"] == 0
    assert client.post(f"{V1}/datasets/{sid}/revert").json()["reverted"] == []  # no body: every image, none unsaved
    assert client.post(f"{V1}/datasets/{sid}/save", json={}).json()["written"] == []
    assert (folder / "img_001.txt").read_text(encoding="utf-8") == "zkchar, blue, circle, smile"
    assert_error(client.post(f"{V1}/datasets/{sid}/revert", json={"images": ["img_001.png"]}), 400, "invalid",
                 field="images")
    assert_error(client.post(f"{V1}/datasets/{sid}/revert", json={"selection": ["../secret.png"]}), 400, "invalid",
                 field="selection")
    assert_error(client.post(f"{V1}/datasets/zzz/revert"), 404, "session_not_found")


def test_a_backup_folder_that_is_a_link_leading_outside_the_dataset_roots_lists_no_backup(services, make_dataset,
                                                                                         tmp_path):
    """GET …/backups listed (and read the manifests of) the backups of a .caption-backups folder linked to elsewhere,
    where a restore or save through it is refused."""
    client = make_client(services)
    folder = make_dataset(count=2) / "10_zkchar"
    sid = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()["session"]
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["solo"], "selection": "all"})
    assert client.post(f"{V1}/datasets/{sid}/save", json={}).status_code == 200
    elsewhere = tmp_path / "outside" / "backups"
    elsewhere.parent.mkdir()
    (folder / ".caption-backups").rename(elsewhere)
    (folder / ".caption-backups").symlink_to(elsewhere, target_is_directory=True)
    sid = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()["session"]
    assert client.get(f"{V1}/datasets/{sid}/backups").json() == {"backups": []}
    refused = assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={}), 400, "invalid")
    assert ".caption-backups leads outside the allowed folders" in refused["message"]


def test_opening_a_folder_after_a_restart_reports_the_unsaved_edits_it_restored(services, make_dataset, app_settings,
                                                                                  fake_host):
    client = make_client(services)
    folder = make_dataset(count=3) / "10_zkchar"
    opened = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()
    assert opened["restored"] == 0 and opened["not_restored"] == [] and "note" not in opened
    sid = opened["session"]
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["solo"], "selection": ["img_000.png", "img_001.png"]})
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["smile"], "selection": ["img_002.png"]})
    services.close()  # the server stops
    (folder / "img_002.txt").write_text("edited, elsewhere", encoding="utf-8")

    restarted = Services.create(app_settings, fake_host, start=False)
    try:
        reopened = make_client(restarted).post(f"{V1}/datasets/open", json={"path": str(folder)})
        assert reopened.status_code == 201, reopened.text
        body = reopened.json()
        assert body["restored"] == 2 and body["unsaved"] == 2 and body["not_restored"] == ["img_002.png"]
        assert body["note"].startswith("Restored 2 unsaved caption edit(s) from ")
        assert "their captions changed on disk since: img_002.png" in body["note"]
        assert body["history"]["undo"][0].startswith("Restore unsaved edits from ")
    finally:
        restarted.close()


def test_tag_session_paths_and_autotag_errors(services, make_dataset):
    client = make_client(services)
    assert_error(client.post(f"{V1}/datasets/open", json={"path": "/etc"}), 403, field="path")
    assert_error(client.post(f"{V1}/datasets/open", json={"path": str(services.settings.dataset_roots[0]) + "/../../"}), 403)
    sid = client.post(f"{V1}/datasets/open", json={"path": str(make_dataset())}).json()["session"]
    empty_tagger = services.settings.dataset_roots[0] / "tagger"
    empty_tagger.mkdir()
    error = assert_error(client.post(f"{V1}/datasets/{sid}/autotag", json={"tagger": str(empty_tagger)}), 400,
                         "tagger_unavailable", "tagger")
    assert "model.onnx" in error["message"]
    assert_error(client.post(f"{V1}/datasets/{sid}/autotag", json={"tagger": "/opt"}), 403, field="tagger")
    for bad, field in (({"trigger_word": ["zk"]}, "trigger_word"), ({"trigger_word": 5}, "trigger_word"),
                       ({"general_threshold": 5}, "general_threshold"), ({"character_threshold": -1}, "character_threshold"),
                       ({"excluded_tags": [1]}, "excluded_tags")):  # each was a 500, or took the session down later
        assert_error(client.post(f"{V1}/datasets/{sid}/autotag", json={"tagger": str(empty_tagger), **bad}), 400,
                     field=field)


def test_a_field_a_route_does_not_take_is_a_400_naming_it_not_ignored(services, make_dataset):
    """``{"backupp": …}`` on restore put the newest backup back: a misspelt field was ignored and the route went on."""
    client = make_client(services)
    folder = make_dataset(count=2) / "10_zkchar"
    sid = client.post(f"{V1}/datasets/open", json={"path": str(folder)}).json()["session"]
    for tag in ("first", "second"):
        client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": [tag], "selection": ["img_000.png"]})
        assert client.post(f"{V1}/datasets/{sid}/save", json={}).status_code == 200
    oldest = client.get(f"{V1}/datasets/{sid}/backups").json()["backups"][-1]["name"]
    refused = assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={"backupp": oldest}), 400, "invalid",
                           field="backupp")
    assert refused["message"] == ("backupp (did you mean backup?): not a field of POST /datasets/{sid}/restore; it "
                                  "takes backup")
    assert (folder / "img_000.txt").read_text(encoding="utf-8").endswith("first, second")  # nothing restored
    for route, body, takes in (
            ("/datasets/open", {"path": str(folder), "recurse": True}, "it takes path, recursive, caption_extension"),
            (f"/datasets/{sid}/save", {"overwrite": True}, "it takes overwrite_changed"),
            (f"/datasets/{sid}/autotag", {"tagger": str(folder), "treshold": 0.5}, "it takes tagger, mode, "),
            (f"/datasets/{sid}/reload", {"all": True}, "it takes no fields: send no body, or {}"),
            (f"/datasets/{sid}/undo", {"steps": 2}, "it takes no fields"),
            ("/jobs/1/resume", {"options": {"max_train_epochs": 20}}, "it takes no fields"),
            ("/jobs/1/pause", {"force": True}, "it takes no fields")):
        error = assert_error(client.post(V1 + route, json=body), 400, "invalid", field=sorted(set(body) - {"path", "tagger"})[0])
        assert takes in error["message"], route
    assert client.post(f"{V1}/datasets/{sid}/reload", json={}).status_code == 200  # no body, or {}: as before
    assert client.post(f"{V1}/datasets/{sid}/undo").status_code == 200


def test_errors_name_the_field_they_are_about(services, client, job_body):
    """Each said field: null, and the dataset check named the command line's --batch-size."""
    dataset = Path(job_body["options"]["train_data_dir"])
    error = assert_error(client.post(f"{V1}/dataset/check", json={"path": str(dataset), "batch_size": 0}), 400,
                         field="batch_size")
    assert error["message"] == "batch_size: 0 images per step; give 1 or more"
    concept = {**job_body, "options": {**job_body["options"], "train_data_dir": str(dataset / "10_zkchar")}}
    assert "is itself a <repeats>_<name> folder" in assert_error(client.post(f"{V1}/jobs", json=concept), 400,
                                                                 field="train_data_dir")["message"]
    sid = client.post(f"{V1}/datasets/open", json={"path": str(dataset / "10_zkchar")}).json()["session"]
    for find in ("(", ""):
        assert_error(client.post(f"{V1}/datasets/{sid}/edit", json={"op": "replace", "find": find, "replacement": "x",
                                                                    "regex": True}), 400, field="find")


@pytest.fixture
def outside_files(tmp_path):
    """A picture and a caption outside every allowed folder, which links inside a dataset lead to."""
    from PIL import Image

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(outside / "secret.png")
    (outside / "secret.txt").write_text("secretword, hidden", encoding="utf-8")
    return outside


def test_links_in_a_dataset_leading_outside_the_roots_are_left_out_never_read_served_or_written(
        services, make_dataset, outside_files):
    """A downloaded dataset holding b.png -> /etc/passwd and b.txt -> /etc/hostname showed the host name as b.png's
    tags and served /etc/passwd as b.png: only the folder was checked against the roots."""
    from PIL import Image

    client = make_client(services)
    folder = make_dataset(count=2) / "10_zkchar"
    (folder / "b.png").symlink_to(outside_files / "secret.png")
    Image.new("RGB", (16, 16)).save(folder / "c.png")
    (folder / "c.txt").symlink_to(outside_files / "secret.txt")
    (folder / "d.png").symlink_to(outside_files / "not-there.png")  # outside, said so: not whether it exists
    (folder / "e.png").symlink_to(folder / "img_000.png")  # a link inside the roots is followed, as the docs say
    (folder / "sub").symlink_to(outside_files, target_is_directory=True)
    opened = client.post(f"{V1}/datasets/open", json={"path": str(folder), "recursive": True})
    assert opened.status_code == 201, opened.text
    assert [image["name"] for image in opened.json()["images"]] == ["e.png", "img_000.png", "img_001.png"]
    assert "secretword" not in opened.text
    assert opened.json()["note"] == ("Not shown: b.png, c.txt, d.png, sub are links leading outside the allowed "
                                     "folders, so they are not read here; copy what they link to into the dataset, or "
                                     "allow those folders.")
    sid = opened.json()["session"]
    for name in ("b.png", "c.png", "sub/secret.png"):
        assert_error(client.get(f"{V1}/datasets/{sid}/image", params={"name": name}), 400, field="name")
    # a link made after the folder was read: refused when served, nothing copied by a save or a restore
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["solo"], "selection": ["img_000.png"]})
    assert client.post(f"{V1}/datasets/{sid}/save", json={}).status_code == 200
    (folder / "img_001.png").unlink()
    (folder / "img_001.png").symlink_to(outside_files / "secret.png")
    assert_error(client.get(f"{V1}/datasets/{sid}/image", params={"name": "img_001.png"}), 403, "path_not_allowed",
                 field="name")
    (folder / "img_000.txt").unlink()
    (folder / "img_000.txt").symlink_to(outside_files / "secret.txt")
    restored = assert_error(client.post(f"{V1}/datasets/{sid}/restore", json={}), 400, "invalid")
    assert "img_000.txt leads outside the allowed folders" in restored["message"]
    client.post(f"{V1}/datasets/{sid}/edit", json={"op": "add", "tags": ["smile"], "selection": ["e.png"]})
    assert client.post(f"{V1}/datasets/{sid}/save", json={"overwrite_changed": True}).status_code == 200
    assert (outside_files / "secret.txt").read_text(encoding="utf-8") == "secretword, hidden"
    backups = [path for path in (folder / ".caption-backups").rglob("*") if path.is_file()]
    assert backups and not any(b"secretword" in path.read_bytes() for path in backups)
    assert "secretword" not in client.get(f"{V1}/datasets/{sid}").text


def test_the_dataset_check_names_links_leading_outside_the_roots_and_reads_nothing_there(services, make_dataset,
                                                                                       outside_files):
    client = make_client(services)
    dataset = make_dataset(count=2)
    concept = dataset / "10_zkchar"
    (concept / "img_001.txt").unlink()
    (concept / "img_001.txt").symlink_to(outside_files / "secret.txt")
    (concept / "b.png").symlink_to(outside_files / "secret.png")
    (concept / "d.png").symlink_to(outside_files / "not-there.png")
    (dataset / "5_other").symlink_to(outside_files, target_is_directory=True)
    report = client.post(f"{V1}/dataset/check", json={"path": str(dataset), "resolution": 64, "min_bucket_reso": 64})
    assert report.status_code == 200, report.text
    assert "secretword" not in report.text
    assert [image["path"] for image in report.json()["images"]] == ["10_zkchar/img_000.png"]
    outside = {(f["path"], f["message"].split(" are ")[0].split(" is ")[0])
               for f in report.json()["findings"] if f["kind"] == "outside-link"}
    assert outside == {("5_other", "5_other"), ("10_zkchar", "b.png, d.png, img_001.txt")}
    assert "broken-link" not in [f["kind"] for f in report.json()["findings"]]


def test_links_in_a_dataset_are_held_to_the_dataset_roots_not_the_data_or_lora_folders(services, make_dataset):
    """img_001.txt -> <data>/jobs/1/webhook.url showed the job's webhook URL as tags: dataset links were held to every
    allowed folder, the data folder (whose job folders hold those URLs) and the Lora folder among them."""
    from PIL import Image

    client = make_client(services)
    settings = services.settings
    job = settings.data_folder / "jobs" / "1"
    job.mkdir(parents=True)
    (job / "webhook.url").write_text("https://hooks.example/secrettoken", encoding="utf-8")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(settings.lora_folder / "card.png")
    dataset = make_dataset(count=2)
    folder = dataset / "10_zkchar"
    (folder / "img_001.txt").unlink()
    (folder / "img_001.txt").symlink_to(job / "webhook.url")
    (folder / "b.png").symlink_to(settings.lora_folder / "card.png")
    opened = client.post(f"{V1}/datasets/open", json={"path": str(folder)})
    assert opened.status_code == 201, opened.text
    assert [image["name"] for image in opened.json()["images"]] == ["img_000.png"] and "secrettoken" not in opened.text
    assert opened.json()["note"].startswith("Not shown: b.png, img_001.txt are links leading outside the allowed folders")
    report = client.post(f"{V1}/dataset/check", json={"path": str(dataset), "resolution": 64, "min_bucket_reso": 64})
    assert report.status_code == 200 and "secrettoken" not in report.text
    assert [f["path"] for f in report.json()["findings"] if f["kind"] == "outside-link"] == ["10_zkchar"]
    # a dataset path elsewhere is refused naming the dataset roots only: the others' paths are not the client's to know
    listed = f"outside the allowed folders ({settings.dataset_roots[0]});"
    for route in ("/dataset/check", "/datasets/open"):
        error = assert_error(client.post(f"{V1}{route}", json={"path": str(settings.lora_folder)}), 403,
                             "path_not_allowed", field="path")
        assert listed in error["message"], error
    (folder / "img_000.png").unlink()
    (folder / "img_000.png").symlink_to(settings.lora_folder / "card.png")
    error = assert_error(client.get(f"{V1}/datasets/{opened.json()['session']}/image", params={"name": "img_000.png"}),
                         403, "path_not_allowed", field="name")
    assert listed in error["message"], error


# --- one real job: the trainer on the tiny model ----------------------------------------------------------------


def test_real_tiny_training_through_the_api(tmp_path, fake_host, monkeypatch):
    """Submit, follow the events to the end, find the file in GET /loras. One epoch of the sample dataset at one
    repeat (4 steps at resolution 64) through a dataset config, which the API checks against the roots as well. The
    run's state goes to the job's folder: in the Lora folder the WebUI would list its files as Lora cards."""
    from lora_trainer.app.bench_api import tiny_job_options, tiny_settings
    from lora_trainer.tiny_model.demo import SAMPLE_DATASET

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the machine's cores are shared: one thread per trainer is fastest
    services = Services.create(tiny_settings(tmp_path), fake_host, poll=0.1)
    try:
        dataset_config = services.settings.data_folder / "dataset.toml"
        dataset_config.write_text(
            f"[[datasets]]\nresolution = 64\nbatch_size = 4\n[[datasets.subsets]]\nimage_dir = '{SAMPLE_DATASET / '10_zkstar'}'\n"
            "num_repeats = 1\ncaption_extension = '.txt'\n", encoding="utf-8")
        client = make_client(services)
        options = tiny_job_options(services.settings.lora_folder, epochs=1)
        del options["output_dir"], options["train_data_dir"]  # the Lora folder by default; the dataset config instead
        created = client.post(f"{V1}/jobs", json={"name": "zkstar-api", "options": {**options, "dataset_config": str(dataset_config),
                                                                                      "save_state": True}})
        assert created.status_code == 201, created.text
        events = [event for _, event in sse_events(client.get(f"{V1}/jobs/{created.json()['id']}/events").text)]
        assert events[-1]["event"] == "end", events[-3:]
        assert [event["step"] for event in events if event["event"] == "step"] == [1, 2, 3, 4]
        assert wait_for(client, created.json()["id"])["status"] == "finished"
        loras = {lora["name"]: lora for lora in client.get(f"{V1}/loras").json()["loras"]}
        assert loras["zkstar"]["metadata"]["ss_network_dim"] == "8"
        assert loras["zkstar"]["path"] == events[-1]["files"][-1]
        job = services.store.get(created.json()["id"])
        assert Path(job.last_state) == job.folder / "states" / "zkstar-state"
        assert (Path(job.last_state) / "model.safetensors").is_file()
        assert [p.name for p in services.settings.lora_folder.rglob("*") if "state" in p.name] == []
    finally:
        services.close()


def test_dataset_config_folders_must_lie_in_the_roots(client, job_body, app_settings, tmp_path):
    config = app_settings.data_folder / "dataset.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n", encoding="utf-8")
    body = {**job_body, "options": {**job_body["options"], "dataset_config": str(config)}}
    del body["options"]["train_data_dir"]
    assert_error(client.post(f"{V1}/jobs", json=body), 403, field="dataset_config")
    missing = Path(job_body["options"]["train_data_dir"]) / "not there"  # allowed, but missing: a 400 as for any input
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{missing}'\n", encoding="utf-8")
    assert_error(client.post(f"{V1}/jobs", json=body), 400, code="not_found", field="dataset_config")
    inside = job_body["options"]["train_data_dir"]  # a mask folder (--masked_loss) is a request's path too
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{inside}'\n"
                      f"conditioning_data_dir = '{tmp_path}'\n", encoding="utf-8")
    body["options"]["masked_loss"] = True
    assert_error(client.post(f"{V1}/jobs", json=body), 403, field="dataset_config")


def test_fine_tuning_metadata_may_not_name_images_outside_the_roots(client, job_body, app_settings, tmp_path):
    """--in_json inside the roots, but naming an image by absolute path elsewhere: refused like the image itself."""
    meta = app_settings.data_folder / "meta.json"
    meta.write_text(json.dumps({str(tmp_path / "secret.png"): {"caption": "x"}}), encoding="utf-8")
    body = {**job_body, "options": {**job_body["options"], "in_json": str(meta)}}
    assert_error(client.post(f"{V1}/jobs", json=body), 403, field="in_json")
    inside = job_body["options"]["train_data_dir"]
    meta.write_text(json.dumps({"img.png": {"caption": "x"}}), encoding="utf-8")
    body["options"]["train_data_dir"] = inside
    assert client.post(f"{V1}/jobs", json=body).status_code == 201

def test_a_lycoris_preset_file_inside_the_roots_is_accepted_by_its_absolute_path(client, job_body, app_settings):
    preset = app_settings.data_folder / "my preset.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel"]\n', encoding="utf-8")
    body = {**job_body, "options": {**job_body["options"], "network_module": "lycoris.kohya",
                                    "network_args": ["algo=loha", f"preset={preset}"]}}
    response = client.post(f"{V1}/jobs", json=body)
    assert response.status_code == 201, response.text
    preset.write_text('module_algo_map = { CrossAttention = { algo = "tlora" } }\n', encoding="utf-8")
    error = assert_error(client.post(f"{V1}/jobs", json={**body, "name": "second"}), 400)
    assert "module_algo_map.CrossAttention" in error["message"] and "my preset.toml" in error["message"]


# --- grids -----------------------------------------------------------------------------------------------------


def test_grid_is_planned_then_generated_in_the_background(services, fake_host):
    import numpy
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["0.5", "1"]}, "y": {"kind": "seed", "values": "1, 2"},
            "settings": {"prompt": "a star", "steps": 3, "sampler": "euler"}}
    created = client.post(f"{V1}/grids", json=body)
    assert created.status_code == 202, created.text
    grid_id = created.json()["id"]
    for _ in range(400):
        status = client.get(f"{V1}/grids/{grid_id}").json()
        if status["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert status["status"] == "finished" and status["progress"] == {"done": 6, "total": 6}  # 2 seeds × (baseline + 2)
    assert status["message"] == "LoRA left out of 6 images"  # what the host said while drawing: not a silent grid
    prompts = sorted(settings.prompt for settings, _ in fake_host.generated)
    assert prompts.count("a star") == 2 and "a star <lora:mylora:0.5>" in prompts
    assert {settings.sampler for settings, _ in fake_host.generated} == {"Euler"}  # the host's name for it
    image = client.get(status["image"])
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    # each mistake names the body's key it is about
    assert_error(client.post(f"{V1}/grids", json={**body, "x": {"kind": "strength", "values": []}}), 400, field="x")
    assert_error(client.post(f"{V1}/grids", json={**body, "y": {"kind": "seed", "values": ["one"]}}), 400, field="y")
    same = assert_error(client.post(f"{V1}/grids", json={**body, "y": body["x"]}), 400, field="y")  # was 202, rows alike
    assert same["message"].startswith("y: both axes are strength axes, and a cell takes the x axis's strength")
    tagged = client.post(f"{V1}/grids", json={**body, "lora": "<lora:mylora:0.7>", "x": {"kind": "prompt", "values": ["star"]}})
    assert tagged.status_code == 202, tagged.text
    for _ in range(400):
        if client.get(f"{V1}/grids/{tagged.json()['id']}").json()["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert "a star <lora:mylora:0.7>" in [settings.prompt for settings, _ in fake_host.generated]  # it was a 400
    typo = assert_error(client.post(f"{V1}/grids", json={**body, "baselin": False}), 400, field="baselin")  # was dropped
    assert typo["message"] == "baselin: not a grid key; use x, y, lora, strength, checkpoint, settings, baseline, confirmed"
    unknown = assert_error(client.post(f"{V1}/grids", json={**body, "lora": "nothing-like-it"}), 400, field="lora")
    assert "press" not in unknown["message"]  # no button in an API answer
    assert_error(client.post(f"{V1}/grids", json={**body, "lora": "/etc/passwd"}), 403, field="lora")
    for strength in ("abc", None, True):
        assert_error(client.post(f"{V1}/grids", json={**body, "x": {"kind": "seed", "values": ["1"]},
                                                       "strength": strength}), 400, field="strength")
    (services.settings.lora_folder / "cut short.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    damaged = assert_error(client.post(f"{V1}/grids", json={**body, "lora": "cut short"}), 400)  # was a 500
    assert "is not a whole safetensors file" in damaged["message"]
    assert_error(client.get(f"{V1}/grids/nope"), 404, "grid_not_found")
    # a checkpoint outside the roots is neither opened nor said to exist; settings are checked before any cell
    outside = {**body, "y": {"kind": "checkpoint", "values": ["/etc/hostname"]}}
    assert_error(client.post(f"{V1}/grids", json=outside), 403, field="y.values")
    beside_the_roots = services.settings.lora_folder.parent  # "is not in the Lora folder" said a file was there
    (beside_the_roots / "there.safetensors").write_bytes(b"x")
    for there_or_not in (beside_the_roots / "there.safetensors", beside_the_roots / "not there.safetensors"):
        assert_error(client.post(f"{V1}/grids", json={**body, "y": {"kind": "lora", "values": [str(there_or_not)]}}), 403,
                     field="y.values")
    assert_error(client.post(f"{V1}/grids", json={**body, "checkpoint": "/etc/nope.safetensors"}), 403, field="checkpoint")
    for wrong in ({"steps": "many"}, {"width": 100000}, {"height": -64}, {"cfg_scale": True}, {"prompt": 5}):
        key = next(iter(wrong))
        assert_error(client.post(f"{V1}/grids", json={**body, "settings": {**body["settings"], **wrong}}), 400,
                     field=f"settings.{key}")
    not_eighths = assert_error(client.post(f"{V1}/grids", json={**body, "settings": {**body["settings"], "width": 100}}),
                               400, field="settings.width")
    assert not_eighths["message"] == "settings.width: 100 is not a multiple of 8 (the image's sides must be); give 96 or 104"
    # a sampler the host lacks: the WebUI would draw every cell with its default one instead
    error = assert_error(client.post(f"{V1}/grids", json={**body, "settings": {"sampler": "Eular a"}}), 400,
                         field="settings.sampler")
    assert "'Eular a' is not a sampler here; use one of Euler, DPM++ 2M Karras" in error["message"]


def test_a_grids_answer_says_what_the_plan_did_and_a_grid_over_the_megapixel_cap_is_refused(services, fake_host):
    """POST /grids planned as the tab does: its run's tag taken out of the prompt was said nowhere, the cap on a grid's
    megapixels the tab applies was not applied, and a string of values was split at every comma, quotes or not."""
    import numpy
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["1"]},
            "y": {"kind": "prompt", "values": '"night, sky", "day, sea"'},
            "settings": {"prompt": "a star, night, sky <lora:mylora:0.7>", "steps": 3}}
    created = client.post(f"{V1}/grids", json=body)
    assert created.status_code == 202, created.text
    for _ in range(400):
        status = client.get(f"{V1}/grids/{created.json()['id']}").json()
        if status["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert status["status"] == "finished", status
    assert "took <lora:mylora:0.7> out of the prompt" in status["message"]
    assert any("day, sea" in settings.prompt for settings, _ in fake_host.generated)  # the quoted value, whole
    big = {**body, "y": {"kind": "seed", "values": "1-50"}, "settings": {"width": 2048, "height": 2048, "steps": 3}}
    error = assert_error(client.post(f"{V1}/grids", json=big), 400)
    assert "megapixels" in error["message"]
    comma = {**body, "x": {"kind": "seed", "values": [1]}, "y": {"kind": "strength", "values": "0,8"}}  # a decimal comma: refused as in the tab, not 0 and 8
    assert "0.8" in assert_error(client.post(f"{V1}/grids", json=comma), 400)["message"]


def test_a_grid_interrupted_before_its_first_cell_says_nothing_was_saved(services, fake_host):
    import numpy
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    fake_host.interrupt_after = 0  # Interrupt pressed before the grid's first cell
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["1"]}, "y": {"kind": "seed", "values": "1"}}
    grid_id = client.post(f"{V1}/grids", json=body).json()["id"]
    for _ in range(400):
        status = client.get(f"{V1}/grids/{grid_id}").json()
        if status["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert status["status"] == "stopped" and status["image"] is None
    assert status["message"] == "no cell finished (interrupted or skipped): nothing was saved"
    assert_error(client.get(f"{V1}/grids/{grid_id}/image"), 409, "grid_not_ready")


def test_a_grid_whose_labels_no_installed_font_draws_says_so_in_its_answer(services, fake_host, monkeypatch):
    """A host without a CJK font drew 蓝色背景 as boxes and said so only in the server's log (once a process): the
    grid's message was null, and an automation user saw boxes with no reason given."""
    import numpy
    from safetensors.numpy import save_file

    from lora_trainer.grid import render

    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    monkeypatch.setattr(render, "_said_no_font", ["an earlier grid's labels"])  # the log has said it already
    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    monkeypatch.setattr(fake_host, "take_warnings", lambda: [])
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["1"]},
            "y": {"kind": "prompt", "values": ["蓝色背景", "红色背景"]}, "settings": {"prompt": "a star, 蓝色背景"}}
    created = client.post(f"{V1}/grids", json=body)
    assert created.status_code == 202, created.text
    status = wait_for_grid(client, created.json()["id"])
    assert status["status"] == "finished", status
    assert "no font installed here draws 蓝色背景红 of the grid's labels: they show as boxes" in status["message"]
    assert "Noto Sans CJK" in status["message"]


def wait_for_grid(client: TestClient, grid_id: str, statuses=("finished", "stopped", "failed")) -> dict:
    return polled(client, f"{V1}/grids/{grid_id}", statuses, 400)


@pytest.fixture
def gated_host(fake_host):
    """``fake_host`` whose ``generate`` waits for ``fake_host.gate`` (set by the test) after saying it began."""
    fake_host.gate, fake_host.drawing = threading.Event(), threading.Semaphore(0)
    generate = fake_host.generate

    def gated(settings, checkpoint=None, progress=None):
        fake_host.drawing.release()
        assert fake_host.gate.wait(20)
        return generate(settings, checkpoint, progress)

    fake_host.generate = gated
    return fake_host


def test_grids_are_listed_newest_first_and_stopped_as_the_tabs_interrupt_stops_them(services, gated_host):
    """There was no GET /grids nor a stop: a mistaken 400-image grid held every later one, and `stopped` could not be
    reached. A running grid stops after the image being drawn and keeps it; a queued one leaves the queue."""
    import numpy
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["0.5", "1"]}, "y": {"kind": "seed", "values": "1-4"}}
    first = client.post(f"{V1}/grids", json=body).json()
    assert gated_host.drawing.acquire(timeout=20)  # drawing its first image
    second = client.post(f"{V1}/grids", json=body).json()
    listed = client.get(f"{V1}/grids").json()["grids"]
    assert [(g["id"], g["status"]) for g in listed] == [(second["id"], "queued"), (first["id"], "running")]
    assert listed[0]["created"] >= listed[1]["created"] and listed[1]["progress"] == {"done": 0, "total": 12}

    dropped = client.post(f"{V1}/grids/{second['id']}/stop").json()
    assert dropped["status"] == "stopped" and "removed from the queue" in dropped["message"]
    assert client.post(f"{V1}/grids/{first['id']}/stop").json()["status"] == "running"  # until its image is drawn
    gated_host.gate.set()
    stopped = wait_for_grid(client, first["id"])
    assert stopped["status"] == "stopped" and stopped["progress"] == {"done": 1, "total": 12}
    assert stopped["message"].startswith("interrupted after 1 of 12 images; the rest are grey")
    assert client.get(stopped["image"]).content[:4] == b"\x89PNG"  # the image drawn is kept
    assert len(gated_host.generated) == 1  # the queued grid drew nothing
    assert_error(client.post(f"{V1}/grids/{first['id']}/stop"), 409, "grid_state")
    assert_error(client.post(f"{V1}/grids/nope/stop"), 404, "grid_not_found")


def test_closing_the_services_stops_the_grid_being_drawn_after_its_image_and_says_what_was_kept(services, gated_host):
    """SIGTERM to the app while a grid was drawing ended in "terminate called without an active exception" (its
    daemon thread inside torch as Python finalized): the exit now stops it after its image, waits, and says so."""
    import numpy
    from safetensors.numpy import save_file

    from lora_trainer.app.grid_queue import grids_at_exit

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["1"]}, "y": {"kind": "seed", "values": "1-3"}}
    running = client.post(f"{V1}/grids", json=body).json()
    assert gated_host.drawing.acquire(timeout=20)
    queued = client.post(f"{V1}/grids", json=body).json()
    stopped = []
    closing = threading.Thread(target=lambda: stopped.extend(services.grids.close()))
    closing.start()
    assert services.grids.get(running["id"]).stop.wait(20)  # told to stop while its image is being drawn
    gated_host.gate.set()
    closing.join(20)
    assert [grid.id for grid in stopped] == [running["id"], queued["id"]] and len(gated_host.generated) == 1
    first, second = grids_at_exit(stopped)
    image = services.settings.grids_folder / running["id"]
    assert first.startswith(f"grid {running['id']} was stopped after 1 of 6 images; those are saved in {image}")
    assert second == (f"grid {queued['id']} (6 images) was dropped before it started; ask for it again once the app "
                      "runs")
    assert services.grids.close() == []
    assert_error(client.post(f"{V1}/grids", json=body), 400)  # the server is shutting down


def test_ctrl_c_again_while_the_exit_waits_for_the_grids_image_is_said_and_ends_without_finalizing(services, gated_host):
    """The KeyboardInterrupt escaped close()'s wait: the rest of the exit was skipped and Python finalized with the
    worker inside torch, the C++ abort the wait was there to prevent."""
    import _thread

    import numpy
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    client = make_client(services)
    body = {"lora": "mylora", "x": {"kind": "strength", "values": ["1"]}, "y": {"kind": "seed", "values": "1-3"}}
    client.post(f"{V1}/grids", json=body)
    assert gated_host.drawing.acquire(timeout=20)
    threading.Timer(0.3, _thread.interrupt_main).start()  # the second Ctrl-C, while the image is still being drawn
    try:
        services.grids.close()
    finally:
        gated_host.gate.set()
    assert services.grids.abandoned  # the app then ends with os._exit after its exit lines


def test_a_second_sigterm_while_the_exit_waits_for_the_grids_image_is_taken_as_a_ctrl_c(services, gated_host, monkeypatch):
    """SIGTERM and Ctrl-Break raise SystemExit in the app: that escaped the wait as the Ctrl-C did."""
    from lora_trainer.app import grid_queue

    worker_join = threading.Thread.join

    def terminated(self, *args, **kwargs):
        if self.name == "lora-trainer-grids":
            raise SystemExit(143)
        return worker_join(self, *args, **kwargs)

    import numpy
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": numpy.ones((1, 1), numpy.float32)},
              str(services.settings.lora_folder / "mylora.safetensors"), metadata={"ss_output_name": "mylora"})
    client = make_client(services)
    client.post(f"{V1}/grids", json={"lora": "mylora", "x": {"kind": "strength", "values": ["1"]},
                                     "y": {"kind": "seed", "values": "1-3"}})
    assert gated_host.drawing.acquire(timeout=20)
    monkeypatch.setattr(grid_queue.threading.Thread, "join", terminated)
    try:
        services.grids.close()
    finally:
        monkeypatch.undo()
        gated_host.gate.set()
    assert services.grids.abandoned


def test_a_job_may_name_its_base_model_by_its_title_in_the_hosts_list(client, fake_host, make_dataset, tmp_path):
    """Automation names checkpoints as the WebUI's API titles them, and the standalone app's embedded model lies
    outside every root: a title from GET /checkpoints is taken as the Train tab takes it, and so is the path listed
    beside it (a client posting the `path` it was given was refused); any other path still needs a root."""
    embedded = tmp_path / "package" / "tiny-sd.safetensors"  # outside the roots, as the shipped model is
    embedded.parent.mkdir()
    shutil.copy(TINY_MODEL_PATH, embedded)
    fake_host._checkpoints["tiny-sd (embedded demo model)"] = embedded
    listed = client.get(f"{V1}/checkpoints").json()["checkpoints"]
    assert listed == [{"title": "tiny-sd (embedded demo model)", "path": str(embedded)}]
    options = {"pretrained_model_name_or_path": listed[0]["title"], "train_data_dir": str(make_dataset()),
               "resolution": 64, "max_train_steps": 5}
    response = client.post(f"{V1}/jobs", json={"name": "zkchar", "options": options})
    assert response.status_code == 201, response.text
    assert response.json()["options"]["pretrained_model_name_or_path"] == str(embedded)
    by_path = {"name": "zkchar2", "options": {**options, "pretrained_model_name_or_path": listed[0]["path"]}}
    response = client.post(f"{V1}/jobs", json=by_path)
    assert response.status_code == 201, response.text
    assert response.json()["options"]["pretrained_model_name_or_path"] == str(embedded)
    beside = embedded.with_name("other.safetensors")  # in the listed file's folder, but not listed itself
    shutil.copy(TINY_MODEL_PATH, beside)
    not_listed = {"name": "zkchar5", "options": {**options, "pretrained_model_name_or_path": str(beside)}}
    assert_error(client.post(f"{V1}/jobs", json=not_listed), 403, "path_not_allowed", "pretrained_model_name_or_path")
    nul = {"name": "zkchar6", "options": {**options, "pretrained_model_name_or_path": f"{embedded}\x00"}}
    assert_error(client.post(f"{V1}/jobs", json=nul), 400, "invalid", "pretrained_model_name_or_path")
    unknown = {"name": "zkchar3", "options": {**options, "pretrained_model_name_or_path": "sd15 [abcd1234]"}}
    error = assert_error(client.post(f"{V1}/jobs", json=unknown), 400, "not_found", "pretrained_model_name_or_path")
    assert "'sd15 [abcd1234]' is not a checkpoint title (GET /checkpoints lists them) nor an absolute path" in error["message"]
    short = {"name": "zkchar4", "options": {**options, "pretrained_model_name_or_path": "tiny-sd"}}  # as the CLI takes it
    response = client.post(f"{V1}/jobs", json=short)
    assert response.status_code == 201, response.text
    assert response.json()["options"]["pretrained_model_name_or_path"] == str(TINY_MODEL_PATH)


def test_a_job_named_as_an_earlier_run_in_the_lora_folder_is_told_its_files_will_be_moved_aside(client, job_body,
                                                                                                 app_settings):
    (app_settings.lora_folder / "zkchar.safetensors").write_bytes(b"the first attempt")
    answer = client.post(f"{V1}/jobs", json=job_body)
    assert answer.status_code == 201, answer.text
    assert any("already holds a run named 'zkchar' (zkchar.safetensors): when this job starts they are moved into "
               f"{app_settings.data_folder / 'replaced'}, not overwritten" in warning for warning in answer.json()["warnings"])


def test_a_job_queued_behind_one_of_the_same_output_name_is_told_it_will_move_that_ones_files_aside(services,
                                                                                                   job_body):
    """Two jobs writing zkchar.safetensors into the Lora folder, queued together: the second moved the first's files
    into replaced/ when it ran, said at POST time by nothing."""
    client = make_client(services)  # the runner is not started: both stay queued
    first = client.post(f"{V1}/jobs", json=job_body).json()
    second = client.post(f"{V1}/jobs", json={**job_body, "name": "zkchar again", "options": {
        **job_body["options"], "output_name": "zkchar"}})
    assert second.status_code == 201, second.text
    said = [warning for warning in second.json()["warnings"] if f"job {first['id']}" in warning]
    assert said == [f"job {first['id']} (queued) also writes the run 'zkchar' in {services.settings.lora_folder}: when "
                    f"this job starts, the files it wrote by then are moved into {services.settings.data_folder / 'replaced'}"
                    ", not overwritten; give this job another output name to keep both where they are"], second.json()
    other = client.post(f"{V1}/jobs", json={**job_body, "name": "zkother"}).json()
    assert not any("also writes" in warning for warning in other.get("warnings", []))


def test_a_job_resumed_behind_one_of_the_same_output_name_is_told_it_will_write_over_that_ones_files(services,
                                                                                                      job_body, tmp_path):
    """A resume writes its own run again, moving nothing aside: it wrote over the files of the job queued before it
    under the same name, said by nothing (POST /jobs said it, a resume did not)."""
    client = make_client(services)  # the runner is not started: jobs stay queued
    paused = client.post(f"{V1}/jobs", json=job_body).json()
    state = tmp_path / "state"
    state.mkdir()
    for name in ("model.safetensors", "train_state.pt"):  # what a state folder holds (resuming checks for them)
        (state / name).write_bytes(b"x")
    services.store.update(paused["id"], status="paused", last_state=str(state))
    queued = client.post(f"{V1}/jobs", json=job_body).json()
    resumed = client.post(f"{V1}/jobs/{paused['id']}/resume")
    assert resumed.status_code == 201, resumed.text
    assert resumed.json()["warnings"] == [
        f"job {queued['id']} (queued) also writes the run 'zkchar' in {services.settings.lora_folder}, and this resumed "
        "job, which runs after it, writes over the files of the same name it saved (a resume moves no files aside); to "
        "keep both, stop this job while it is queued (it has trained nothing yet), and when that job has ended, move its "
        "files out of that folder and resume again from the same state"]
    # the advice, followed: the other job (queued here) kept whole, this one out of the queue, then resumed again
    # (it was refused as "resumed already" by the job taken out of the queue, which saved no state to resume from)
    stopped = client.post(f"{V1}/jobs/{resumed.json()['id']}/stop").json()
    assert stopped["status"] == "stopped" and stopped["message"] == "removed from the queue"
    client.post(f"{V1}/jobs/{queued['id']}/stop")  # ended
    again = client.post(f"{V1}/jobs/{paused['id']}/resume")
    assert again.status_code == 201 and "warnings" not in again.json(), again.text
    assert again.json()["options"]["resume"] == str(state)
    refused = client.post(f"{V1}/jobs/{paused['id']}/resume")  # queued now: one job from one state
    assert refused.status_code == 409 and "was resumed already, as job" in refused.text


def test_spaces_around_a_jobs_name_are_removed_and_said(services, job_body):
    """" lead" became "lead" without a word: a client looking for " lead.safetensors" found nothing. Trimmed as the
    Train tab trims its Output name, and said."""
    client = make_client(services)
    job = client.post(f"{V1}/jobs", json={**job_body, "name": " lead"})
    assert job.status_code == 201, job.text
    assert job.json()["name"] == "lead" and job.json()["options"]["output_name"] == "lead"
    assert "name: ' lead' has spaces at its start or end: they were removed, and 'lead' is used" in job.json()["warnings"]
    named = client.post(f"{V1}/jobs", json={**job_body, "options": {**job_body["options"], "output_name": "zk "}}).json()
    assert named["name"] == "zkchar" and named["options"]["output_name"] == "zk"
    assert [w for w in named["warnings"] if "has spaces" in w] == [
        "output_name: 'zk ' has spaces at its start or end: they were removed, and 'zk' is used"]
    plain = client.post(f"{V1}/jobs", json={**job_body, "name": "plain"}).json()
    assert not any("has spaces" in warning for warning in plain.get("warnings", []))


def test_a_job_whose_captions_lie_under_another_extension_is_told_so_when_submitted(client, job_body):
    """Without caption_extension the captions are read from .caption files, as sd-scripts reads them; a dataset
    captioned in .txt then trained every image on its class token alone, said only as an event once it ran."""
    answer = client.post(f"{V1}/jobs", json=job_body)
    assert answer.status_code == 201, answer.text
    assert any("have no .caption caption and train with" in warning and "add --caption_extension .txt" in warning
               for warning in answer.json().get("warnings", [])), answer.json()
    fixed = client.post(f"{V1}/jobs", json={**job_body, "name": "txt",
                                            "options": {**job_body["options"], "caption_extension": ".txt"}})
    assert "warnings" not in fixed.json()
