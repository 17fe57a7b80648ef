"""Pure drawing: arrays and frames in, Altair charts or HTML out (no torch, no SQL)."""

import altair as alt

# Views bound their own sizes (windows, bins, thumbnails); Altair's 5,000-row guard would only
# refuse a 96 x 96 detail window.
alt.data_transformers.disable_max_rows()
