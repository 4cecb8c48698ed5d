"""The feature browser in a real headless Chromium against a real API server and store.

The page renders from its URL query (store, site, feature, prompt); Chromium
dumps the rendered DOM and takes a screenshot, and both are checked for the
content the store holds: the top examples with the hit token highlighted, the
feature's summary, and the prompt's tokens with their features.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from api_server import SITES, build_store, thread_server
from PIL import Image

from circuitscan.schemas.models import ModelSpec
from circuitscan.services.api import ApiSettings
from circuitscan.services.model_loading import load_tokenizer
from circuitscan.services.store import feature_summary, features_at, top_examples

pytestmark = pytest.mark.integration

SITE = SITES[1].label
WINDOW = (1400, 1000)
HIGHLIGHT = (0xF7, 0x90, 0x09)  # .tok.hit background in services/web/style.css


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing on CI (.ci/run installs Debian's chromium package)")
    pytest.skip("no Chromium on this machine (apt-get install chromium)")


def _run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        # Virtual time runs until the page's fetches and rendering are done.
        "--virtual-time-budget=20000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def browser_store(tmp_path_factory, tiny_hf_model_dir):
    root = tmp_path_factory.mktemp("browser") / "stores"
    root.mkdir()
    store = build_store(root / "ioi-demo", tiny_hf_model_dir)
    return root, store


def test_feature_browser_renders_store_content(browser_store, tmp_path, tiny_hf_model_dir):
    chromium = _chromium()
    root, store = browser_store
    tokenizer = load_tokenizer(ModelSpec(source=str(tiny_hf_model_dir)))
    # The feature with the largest attribution at the last token of prompt 0.
    last = len(store.prompt_tokens(0)) - 1
    feature = features_at(store, SITE, 0, last, limit=1).feature_ids[0]
    examples = top_examples(store, SITE, feature, n=10, context=6)
    summary = feature_summary(store, SITE, feature)
    hits = [tokenizer.decode([ex.context_token_ids[ex.hit_index]]) for ex in examples]

    with thread_server(ApiSettings(store_root=root)) as url:
        page = f"{url}/web/?store=ioi-demo&site={SITE}&feature={feature}&prompt=0"
        shot = tmp_path / "browser.png"
        screenshot = _run_chromium(chromium, tmp_path / "profile1", f"--screenshot={shot}", page)
        assert shot.is_file(), screenshot.stderr[-3000:]
        dumped = _run_chromium(chromium, tmp_path / "profile2", "--dump-dom", page)
    dom = dumped.stdout
    assert 'data-state="ready"' in dom, (dumped.stderr[-2000:], dom[-3000:])

    # Top examples: one list item each, the hit token highlighted.
    highlighted = [
        html.unescape(t) for t in re.findall(r'<span class="tok hit"[^>]*>([^<]*)</span>', dom)
    ]
    assert highlighted == hits
    # The summary block names the feature and shows its count.
    summary_block = re.search(r'<dl id="summary" data-feature="(\d+)">(.*?)</dl>', dom, re.S)
    assert summary_block and int(summary_block.group(1)) == feature
    assert f"<dt>count</dt><dd>{summary.count}</dd>" in summary_block.group(2)
    # The prompt view: every token of prompt 0, and the chosen feature among the last token's.
    prompt_tokens = [tokenizer.decode([int(t)]) for t in store.prompt_tokens(0)]
    cells = [html.unescape(t) for t in re.findall(r'<td class="token">([^<]*)</td>', dom)]
    assert cells == prompt_tokens
    assert f'data-feature="{feature}"' in dom

    # The screenshot: the window's size, real content, and the highlight colour on it.
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200
    highlight_pixels = sum(count for count, rgb in colours if rgb == HIGHLIGHT)
    assert highlight_pixels > 100 * len(hits)
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("CIRCUITSCAN_SCREENSHOT_DIR")
    if keep:  # for looking at the page by eye
        shutil.copy(shot, Path(keep) / "browser.png")
