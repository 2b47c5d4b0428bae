"""The guided-generation web page: its JSON routes over real HTTP, and the page itself in a real headless Chromium."""

import json
import shutil
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from transformers import AutoModelForCausalLM, AutoTokenizer

from lime_hf import LimeTokenizer
from lime_hf.integrations.app import AppServer, parse_request
from lime_hf.tagged_generation import generate_with_tags
from tests.conftest import share_annotator
from tests.test_cli_errors import save_tiny_lime

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from app_screenshot import drive, start_chromium  # noqa: E402 - the page is driven as the screenshot script does

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCHEDULE = ["NNP", "VBD", "DT"]


@pytest.fixture(scope="module")
def server(bpe_tokenizer, annotator, tmp_path_factory):
    """The app on a free loopback port, serving a tiny random LIME+1 model, in a background thread."""
    folder = save_tiny_lime(
        tmp_path_factory.mktemp("app-model"), LimeTokenizer.from_tokenizer(bpe_tokenizer), 1
    )
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = share_annotator(AutoTokenizer.from_pretrained(folder), annotator)
    app = AppServer(("127.0.0.1", 0), model, tokenizer, name="tiny-lime-plus-1")
    thread = threading.Thread(target=app.serve_forever, daemon=True)
    thread.start()
    yield app
    app.shutdown()
    app.server_close()


def url(server: AppServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def post(server: AppServer, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url(server, "/api/generate"), json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_model_route_lists_the_guide_labels(server):
    with urllib.request.urlopen(url(server, "/api/model"), timeout=30) as response:
        info = json.load(response)
    assert info["name"] == "tiny-lime-plus-1" and info["metadata_shift"] == 1
    assert info["fields"]["pos"] == server.tokenizer.metadata_fields["pos"][3:]  # no <pad>, <unk>, <special>
    assert "B-PERSON" in info["fields"]["ner"]


def test_generate_route_returns_the_guided_tokens_with_their_tags(server):
    status, answer = post(server, {"prompt": "Emma was", "guide": {"pos": SCHEDULE}, "max_new_tokens": 4})
    assert status == 200, answer
    expected = generate_with_tags(
        server.model, server.tokenizer, "Emma was", {"pos": SCHEDULE}, max_new_tokens=4, do_sample=False
    )[0]
    assert answer == expected
    assert [token["asked"].get("pos") for token in answer["tokens"]] == [*SCHEDULE, None]
    encoding = server.tokenizer("Emma was", return_tensors="pt")
    ids = server.model.generate(**encoding, guidance={"pos": [SCHEDULE]}, max_new_tokens=4, do_sample=False)
    assert answer["text"] == server.tokenizer.decode(ids[0], skip_special_tokens=True)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "  "}, "The prompt is empty"),
        ({"prompt": "Emma", "max_new_tokens": 0}, "Steps must be a whole number from 1 to 64, got 0"),
        ({"prompt": "Emma", "guide": {"pos": ["NNP", "", "DT"]}}, "Guidance must be contiguous"),
        ({"prompt": "Emma", "guide": {"pos": ["VERB"]}}, "Unknown label 'VERB' for metadata field 'pos'"),
    ],
)
def test_a_bad_request_is_a_400_saying_why(body, message, server):
    status, answer = post(server, body)
    assert status == 400 and message in answer["error"]


def test_parse_request_keeps_the_schedule_and_drops_empty_fields():
    assert parse_request({"prompt": "Emma", "guide": {"pos": ["NN"], "ner": []}, "max_new_tokens": 3}) == (
        "Emma",
        {"pos": ["NN"]},
        3,
    )
    with pytest.raises(ValueError, match="JSON object"):
        parse_request(["Emma"])


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium is not installed: `apt-get install -y chromium chromium-driver` (Debian) runs this test",
)
def test_the_page_in_headless_chromium_generates_guided_tokens_coloured_by_tag(server, tmp_path):
    driver = start_chromium(tmp_path / "profile")
    try:
        drive(driver, url(server, "/"), "Emma was", SCHEDULE, steps=4)  # types, picks, clicks, as a user does
        assert "tiny-lime-plus-1: LIME+1 (guidable)" in driver.find_element(By.ID, "model").text
        expected = generate_with_tags(
            server.model, server.tokenizer, "Emma was", {"pos": SCHEDULE}, max_new_tokens=4, do_sample=False
        )[0]
        assert driver.find_element(By.ID, "text").get_attribute("textContent") == expected["text"]
        boxes = driver.find_elements(By.CSS_SELECTOR, "#tokens .token")
        for box, token in zip(boxes, expected["tokens"], strict=True):
            found, asked = token["found"]["pos"], token["asked"].get("pos")
            assert box.find_element(By.CLASS_NAME, "piece").get_attribute("textContent") == token["token"]
            tags = box.find_element(By.CLASS_NAME, "tags").get_attribute("textContent")
            assert tags == (f"asked {asked} · " if asked else "") + f"spaCy {found}"
            assert ("miss" in box.get_attribute("class")) == (asked is not None and asked != found)
        colours = {box.value_of_css_property("background-color") for box in boxes}
        assert len(colours) == len(
            {token["found"]["pos"] for token in expected["tokens"]}
        )  # one colour per tag
        legend = driver.find_element(By.ID, "legend").text
        agree = sum(token["asked"].get("pos") == token["found"]["pos"] for token in expected["tokens"][:3])
        assert f"spaCy finds the asked tag on {agree} of 3 guided tokens" in legend
        screenshot = tmp_path / "app.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
