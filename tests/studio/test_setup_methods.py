"""Set up offers every method of core.methods, each with its one sentence (what it trains and what it costs), and a
method that cannot do what the form asks is explained next to the field to change."""

from PySide6.QtCore import Qt
from studio_support import IGNORE_OFFSCREEN

from finetune_studio.core import methods
from finetune_studio.studio.state.setup import SetupState

pytestmark = IGNORE_OFFSCREEN


def test_every_method_is_offered_with_its_sentence(qtbot, window):
    page, st = window.setup_page, window.setup_state
    assert list(page.method.buttons) == list(methods.NAMES)
    for name, button in page.method.buttons.items():
        assert button.text() == methods.method(name).label
        assert button.toolTip() == methods.method(name).summary
    qtbot.mouseClick(page.method.buttons["houlsby"], Qt.MouseButton.LeftButton)
    assert st.values["method"] == "houlsby"
    assert page.method_about.text() == methods.method("houlsby").summary and page.method_about.isVisible()
    qtbot.mouseClick(page.method.buttons["ia3"], Qt.MouseButton.LeftButton)
    assert page.method_about.text() == methods.method("ia3").summary


def test_a_method_that_cannot_pack_is_explained_at_packing():
    st = SetupState({"dataset": "d.jsonl", "method": "prompt_tuning"})
    assert "set packing to false" in st.errors["packing"] and not st.ready
    st.set("packing", False)
    assert st.ready and st.config is not None and st.config.method == "prompt_tuning"
