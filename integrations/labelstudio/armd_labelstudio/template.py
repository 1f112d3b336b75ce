"""The Label Studio project the bridge sets up: a pairwise comparison template and its instructions."""

from .messages import CHOICES_NAME

#: Prompt above, responses A and B side by side, one required answer: A, B or Tie (hotkeys 1, 2, 3).
LABEL_CONFIG = f"""<View>
  <Style>
    .armd-prompt {{ background: #f4f6fb; border-radius: 6px; padding: 8px 14px; margin-bottom: 10px; }}
    .armd-pair {{ display: flex; gap: 14px; align-items: stretch; }}
    .armd-side {{ flex: 1 1 0; min-width: 0; border: 1px solid #d6dae3; border-radius: 6px; padding: 8px 14px; }}
    .armd-side-prompt {{ color: #555; font-style: italic; }}
    .armd-side-prompt:has(.lsf-richtext__line:empty) {{ display: none; }}
  </Style>
  <View className="armd-prompt">
    <Header value="Prompt" size="5"/>
    <Text name="prompt" value="$prompt"/>
  </View>
  <View className="armd-pair">
    <View className="armd-side">
      <Header value="Response A" size="5"/>
      <View className="armd-side-prompt"><Text name="prompt_a" value="$prompt_a"/></View>
      <Text name="text_a" value="$text_a"/>
    </View>
    <View className="armd-side">
      <Header value="Response B" size="5"/>
      <View className="armd-side-prompt"><Text name="prompt_b" value="$prompt_b"/></View>
      <Text name="text_b" value="$text_b"/>
    </View>
  </View>
  <Header value="Which response is better?" size="5"/>
  <Choices name="{CHOICES_NAME}" toName="text_a" choice="single-radio" showInline="true" required="true">
    <Choice value="A" hotkey="1"/>
    <Choice value="B" hotkey="2"/>
    <Choice value="Tie" hotkey="3"/>
  </Choices>
</View>
"""

INSTRUCTIONS = (
    "<p>Read the prompt and the two responses, then choose the better response: <b>A</b>, <b>B</b>, "
    "or <b>Tie</b> when neither is better. Submit to get the next comparison.</p>"
    "<p>These comparisons are chosen by armd as the most informative ones for the reward model; each "
    "expires after a while and then leaves the queue. An answer submitted after its comparison expired "
    "is not used.</p>"
)

DESCRIPTION = "Pairwise comparisons requested by armd (managed by armd-labelstudio)."
