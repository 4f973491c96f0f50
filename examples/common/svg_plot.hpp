// examples/common/svg_plot.hpp: two kinds of picture as self-contained SVG text. A line chart
// draws one line per named series over integer x (a statistic per layer); a heatmap draws a
// matrix with a colour bar (layer x expert fractions, or a confusion matrix). No fonts, scripts
// or links outside the file, so a browser or GitHub shows it as it is.
//
// Non-finite values are never drawn as numbers: a line has a gap there (and its legend entry says
// where), a heatmap cell is hatched grey and says "n/a". All text is escaped.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moe/config.hpp"

namespace report {

using moe::Index;

// ---- text ---------------------------------------------------------------------------------------

namespace detail {

// Length of the well-formed UTF-8 sequence that starts at text[i] (RFC 3629: no overlong forms,
// surrogates or code points past U+10FFFF), or 0 when the bytes there are not one.
inline std::size_t utf8_sequence_length(std::string_view text, std::size_t i) {
  const auto byte = [&](std::size_t j) { return static_cast<unsigned char>(text[j]); };
  const auto continuation = [&](std::size_t j) { return j < text.size() && (byte(j) & 0xC0) == 0x80; };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return continuation(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!continuation(i + 1) || !continuation(i + 2)) return 0;
    if ((c == 0xE0 && byte(i + 1) < 0xA0) || (c == 0xED && byte(i + 1) > 0x9F)) return 0;
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!continuation(i + 1) || !continuation(i + 2) || !continuation(i + 3)) return 0;
    if ((c == 0xF0 && byte(i + 1) < 0x90) || (c == 0xF4 && byte(i + 1) > 0x8F)) return 0;
    return 4;
  }
  return 0;
}

constexpr std::string_view replacement_character = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace detail

// Text for XML content and attribute values: & < > " ' as entities; control characters, the
// non-characters U+FFFE/U+FFFF and bytes that are not well-formed UTF-8 become U+FFFD, so no name
// can break the document.
inline std::string xml_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = detail::utf8_sequence_length(text, i);
    const std::string_view sequence = text.substr(i, std::max<std::size_t>(length, 1));
    i += sequence.size();
    if (length == 0 || sequence == "\xEF\xBF\xBE" || sequence == "\xEF\xBF\xBF") {
      out += detail::replacement_character;
      continue;
    }
    switch (sequence[0]) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        if (length == 1 && static_cast<unsigned char>(sequence[0]) < 0x20 && sequence[0] != '\t' &&
            sequence[0] != '\n' && sequence[0] != '\r')
          out += detail::replacement_character;
        else
          out += sequence;
    }
  }
  return out;
}

// value with `decimals` digits after the point, independent of the locale; "n/a" when not finite.
inline std::string format_fixed(double value, int decimals) {
  if (!std::isfinite(value)) return "n/a";
  char buffer[64];
  auto [end, error] =
      std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::fixed, std::clamp(decimals, 0, 17));
  if (error != std::errc{}) {  // |value| too large for fixed notation in 64 characters
    auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::scientific, 3);
    end = result.ptr;
  }
  std::string text(buffer, end);
  if (text.front() == '-' && text.find_first_not_of("-0.") == std::string::npos) text.erase(0, 1);  // "-0.00"
  return text;
}

namespace detail {

// A coordinate: at most two decimals, trailing zeros dropped.
inline std::string coordinate(double value) {
  std::string text = format_fixed(value, 2);
  if (text.find('.') != std::string::npos) {
    while (text.back() == '0') text.pop_back();
    if (text.back() == '.') text.pop_back();
  }
  return text;
}

// Width of text in pixels at `font_size`, estimated (no font metrics here): about 0.56 em per
// character of a sans-serif font, counting UTF-8 code points rather than bytes.
inline double text_width(std::string_view text, double font_size) {
  std::size_t characters = 0;
  for (char c : text) characters += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return 0.56 * font_size * double(characters);
}

constexpr std::string_view font_family = "DejaVu Sans, Helvetica, Arial, sans-serif";

inline std::string open_svg(double width, double height, std::string_view title) {
  const std::string w = coordinate(width), h = coordinate(height);
  std::string svg = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  svg += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + w + "\" height=\"" + h + "\" viewBox=\"0 0 " + w + " " +
         h + "\" font-family=\"" + std::string(font_family) + "\">\n";
  svg += "<title>" + xml_escape(title) + "</title>\n";
  svg += "<rect x=\"0\" y=\"0\" width=\"" + w + "\" height=\"" + h + "\" fill=\"#ffffff\"/>\n";
  return svg;
}

struct TextStyle {
  double size = 12;
  std::string_view anchor = "start";  // start, middle, end
  std::string_view fill = "#222222";
  bool bold = false;
  double rotate = 0;  // degrees, about the anchor point
};

inline std::string text(double x, double y, std::string_view content, const TextStyle& style) {
  std::string svg = "<text x=\"" + coordinate(x) + "\" y=\"" + coordinate(y) + "\" font-size=\"" +
                    coordinate(style.size) + "\" text-anchor=\"" + std::string(style.anchor) + "\" fill=\"" +
                    std::string(style.fill) + "\"";
  if (style.bold) svg += " font-weight=\"bold\"";
  if (style.rotate != 0)
    svg += " transform=\"rotate(" + coordinate(style.rotate) + " " + coordinate(x) + " " + coordinate(y) + ")\"";
  return svg + ">" + xml_escape(content) + "</text>\n";
}

inline std::string line(double x1, double y1, double x2, double y2, std::string_view stroke, double width = 1,
                        std::string_view extra = {}) {
  std::string svg = "<line x1=\"" + coordinate(x1) + "\" y1=\"" + coordinate(y1) + "\" x2=\"" + coordinate(x2) +
                    "\" y2=\"" + coordinate(y2) + "\" stroke=\"" + std::string(stroke) + "\" stroke-width=\"" +
                    coordinate(width) + "\"";
  if (!extra.empty()) svg += " " + std::string(extra);
  return svg + "/>\n";
}

inline std::string rect(double x, double y, double width, double height, std::string_view fill,
                        std::string_view extra = {}) {
  std::string svg = "<rect x=\"" + coordinate(x) + "\" y=\"" + coordinate(y) + "\" width=\"" + coordinate(width) +
                    "\" height=\"" + coordinate(height) + "\" fill=\"" + std::string(fill) + "\"";
  if (!extra.empty()) svg += " " + std::string(extra);
  return svg + "/>\n";
}

// Tick positions at 1, 2 or 5 times a power of ten, about `target` of them over [low, high], and
// the decimals that print them exactly.
struct Ticks {
  std::vector<double> values{};
  double step = 1;
  int decimals = 0;
};

inline Ticks nice_ticks(double low, double high, int target) {
  Ticks ticks;
  const double span = high - low;
  if (!(span > 0) || !std::isfinite(span)) return ticks;
  const double raw = span / std::max(target, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double normalized = raw / magnitude;
  ticks.step = (normalized < 1.5 ? 1 : normalized < 3 ? 2 : normalized < 7 ? 5 : 10) * magnitude;
  ticks.decimals = std::max(0, int(-std::floor(std::log10(ticks.step) + 1e-9)));
  const double first = std::ceil(low / ticks.step - 1e-9);
  for (double i = first; i * ticks.step <= high + ticks.step * 1e-9; ++i) ticks.values.push_back(i * ticks.step);
  return ticks;
}

// A sequential colour scale from pale cream (low) through orange to dark red (high): hotter is
// larger, and lightness falls monotonically so it also reads in grey.
inline std::array<double, 3> heat_colour(double t) {
  static constexpr std::array<std::array<double, 4>, 6> anchors = {{
      {0.0, 255, 251, 232},
      {0.2, 254, 227, 145},
      {0.4, 253, 177, 82},
      {0.6, 238, 108, 49},
      {0.8, 186, 40, 39},
      {1.0, 98, 10, 38},
  }};
  t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0);
  std::size_t upper = 1;
  while (upper + 1 < anchors.size() && t > anchors[upper][0]) ++upper;
  const auto& a = anchors[upper - 1];
  const auto& b = anchors[upper];
  const double w = (t - a[0]) / (b[0] - a[0]);
  return {a[1] + w * (b[1] - a[1]), a[2] + w * (b[2] - a[2]), a[3] + w * (b[3] - a[3])};
}

inline std::string hex_colour(const std::array<double, 3>& rgb) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string hex = "#";
  for (double channel : rgb) {
    const int v = std::clamp(int(std::lround(channel)), 0, 255);
    hex += digits[v / 16];
    hex += digits[v % 16];
  }
  return hex;
}

// Dark text on light colours, white on dark ones (relative luminance, sRGB approximated).
inline std::string_view text_colour_on(const std::array<double, 3>& rgb) {
  const double luminance = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255.0;
  return luminance < 0.5 ? "#ffffff" : "#1a1a1a";
}

// Grey with diagonal hatching: "no value here", unlike any colour of the scale.
inline std::string not_available_pattern() {
  return "<defs><pattern id=\"not-available\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" "
         "patternTransform=\"rotate(45)\"><rect width=\"6\" height=\"6\" fill=\"#d4d4d4\"/>"
         "<line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#9a9a9a\" stroke-width=\"2\"/></pattern></defs>\n";
}

}  // namespace detail

// ---- line chart -----------------------------------------------------------------------------------

enum class Marker { circle, square, triangle, diamond, triangle_down, none };

struct Series {
  std::string name{};
  std::vector<double> y{};  // y[i] is drawn at x = x_first + i; non-finite values leave a gap
  std::string colour{};     // "#rrggbb"; empty: taken from a default palette by position
  Marker marker = Marker::circle;
};

// A labelled dashed horizontal line, e.g. the uniform level 1/N.
struct ReferenceLine {
  double y = 0;
  std::string label{};
};

struct LineChart {
  std::string title{};
  std::string x_label = "layer";
  std::string y_label{};
  double x_first = 0;
  std::vector<Series> series{};
  std::optional<std::array<double, 2>> y_range{};  // fixed [low, high]; default: fits data and references
  std::vector<ReferenceLine> references{};
};

namespace detail {

inline std::string marker_shape(Marker marker, double x, double y, std::string_view colour) {
  const std::string fill = "fill=\"" + std::string(colour) + "\" stroke=\"#ffffff\" stroke-width=\"1\"";
  const auto point = [](double px, double py) { return coordinate(px) + "," + coordinate(py); };
  switch (marker) {
    case Marker::circle:
      return "<circle cx=\"" + coordinate(x) + "\" cy=\"" + coordinate(y) + "\" r=\"4.5\" " + fill + "/>\n";
    case Marker::square:
      return rect(x - 4, y - 4, 8, 8, colour, "stroke=\"#ffffff\" stroke-width=\"1\"");
    case Marker::triangle:
      return "<polygon points=\"" + point(x, y - 5.5) + " " + point(x - 5, y + 4) + " " + point(x + 5, y + 4) + "\" " +
             fill + "/>\n";
    case Marker::triangle_down:
      return "<polygon points=\"" + point(x, y + 5.5) + " " + point(x - 5, y - 4) + " " + point(x + 5, y - 4) + "\" " +
             fill + "/>\n";
    case Marker::diamond:
      return "<polygon points=\"" + point(x, y - 5.5) + " " + point(x + 5.5, y) + " " + point(x, y + 5.5) + " " +
             point(x - 5.5, y) + "\" " + fill + "/>\n";
    case Marker::none:
      return {};
  }
  return {};
}

inline std::string_view palette_colour(std::size_t index) {
  // Okabe-Ito's colour-blind-safe set, without its yellow (too light on white).
  static constexpr std::array<std::string_view, 7> palette = {"#0072b2", "#d55e00", "#009e73", "#cc79a7",
                                                              "#e69f00", "#56b4e9", "#000000"};
  return palette[index % palette.size()];
}

}  // namespace detail

// The chart as a complete SVG document: the plot, reference-line labels in its right margin, the
// legend under it. Each series is one <path class="series">.
inline std::string line_chart_svg(const LineChart& chart) {
  using namespace detail;
  constexpr double plot_width = 520, plot_height = 300, left = 72, top = 48;
  constexpr double legend_row = 22, legend_sample = 28, title_size = 16, label_size = 13, tick_size = 11;

  // Legend entries say where a series has no value.
  std::size_t points = 0;
  std::vector<std::string> legend;
  for (const Series& s : chart.series) {
    points = std::max(points, s.y.size());
    std::string entry = s.name, missing;
    int listed = 0;
    for (std::size_t i = 0; i < s.y.size(); ++i) {
      if (std::isfinite(s.y[i])) continue;
      if (listed == 3) {
        missing += ", ...";
        break;
      }
      if (listed++) missing += ", ";
      missing += format_fixed(chart.x_first + double(i), 0);
    }
    if (!missing.empty()) entry += " (n/a at " + chart.x_label + " " + missing + ")";
    legend.push_back(entry);
  }

  // x: one integer per point, a little room at both ends so the end markers clear the axes.
  const double x_low = chart.x_first - 0.4, x_high = chart.x_first + double(std::max<std::size_t>(points, 1) - 1) + 0.4;
  double y_low = 0, y_high = 1;
  Ticks y_ticks;
  if (chart.y_range) {
    y_low = (*chart.y_range)[0];
    y_high = (*chart.y_range)[1];
    moe::check(std::isfinite(y_low) && std::isfinite(y_high) && y_low < y_high, "report: line chart '", chart.title,
               "' has y range [", y_low, ", ", y_high, "]; it needs finite low < high");
    y_ticks = nice_ticks(y_low, y_high, 5);
  } else {
    bool any = false;
    const auto include = [&](double v) {
      if (!std::isfinite(v)) return;
      y_low = any ? std::min(y_low, v) : v;
      y_high = any ? std::max(y_high, v) : v;
      any = true;
    };
    for (const Series& s : chart.series)
      for (double v : s.y) include(v);
    for (const ReferenceLine& r : chart.references) include(r.y);
    if (!any) y_low = 0, y_high = 1;
    if (y_high - y_low <= 1e-12 * std::max(1.0, std::abs(y_high))) {
      const double pad = std::max(0.5, 0.1 * std::abs(y_high));
      y_low -= pad, y_high += pad;
    }
    y_ticks = nice_ticks(y_low, y_high, 5);
    y_low = std::floor(y_low / y_ticks.step + 1e-9) * y_ticks.step;
    y_high = std::ceil(y_high / y_ticks.step - 1e-9) * y_ticks.step;
    y_ticks = nice_ticks(y_low, y_high, 5);
  }
  const auto px = [&](double x) { return left + (x - x_low) / (x_high - x_low) * plot_width; };
  const auto py = [&](double y) { return top + (y_high - y) / (y_high - y_low) * plot_height; };

  // Reference labels sit right of the plot at their line's height, pushed apart when close.
  std::vector<std::pair<double, std::string>> reference_labels;
  for (const ReferenceLine& reference : chart.references)
    if (std::isfinite(reference.y) && reference.y >= y_low && reference.y <= y_high)
      reference_labels.emplace_back(py(reference.y) + 4, reference.label);
  std::sort(reference_labels.begin(), reference_labels.end());
  double right_margin = 24;
  for (std::size_t i = 0; i < reference_labels.size(); ++i) {
    if (i > 0) reference_labels[i].first = std::max(reference_labels[i].first, reference_labels[i - 1].first + 13);
    right_margin = std::max(right_margin, text_width(reference_labels[i].second, tick_size) + 20);
  }

  // The legend flows in rows under the x axis label.
  const double legend_top = top + plot_height + 66, row_end = left + plot_width + right_margin;
  std::vector<std::array<double, 2>> legend_at;
  double legend_x = left, legend_y = legend_top, widest_row = 0;
  for (const std::string& entry : legend) {
    const double entry_width = legend_sample + 6 + text_width(entry, label_size) + 22;
    if (legend_x > left && legend_x + entry_width > row_end) legend_x = left, legend_y += legend_row;
    legend_at.push_back({legend_x, legend_y});
    legend_x += entry_width;
    widest_row = std::max(widest_row, legend_x);
  }
  const double width = std::max({row_end, widest_row, text_width(chart.title, title_size) + 32});
  const double height = (legend.empty() ? top + plot_height + 56 : legend_y + 16);

  std::string svg = open_svg(width, height, chart.title);
  // Data outside a fixed range is cut at the plot's edge (with room for a marker on the edge).
  svg += "<defs><clipPath id=\"plot-area\"><rect x=\"" + coordinate(left - 6) + "\" y=\"" + coordinate(top - 6) +
         "\" width=\"" + coordinate(plot_width + 12) + "\" height=\"" + coordinate(plot_height + 12) +
         "\"/></clipPath></defs>\n";
  svg += text(left + plot_width / 2, 28, chart.title, {.size = title_size, .anchor = "middle", .bold = true});

  // Axes: horizontal grid at every y tick, integer x ticks.
  for (double v : y_ticks.values) {
    const double y = py(v);
    svg += line(left, y, left + plot_width, y, "#e6e6e6");
    svg += line(left - 5, y, left, y, "#333333");
    svg += text(left - 8, y + 4, format_fixed(v, y_ticks.decimals), {.size = tick_size, .anchor = "end"});
  }
  const double x_step = std::ceil(std::max(1.0, nice_ticks(0, std::max(x_high - x_low - 0.8, 1.0), 10).step));
  for (double x = chart.x_first; x <= x_high; x += x_step) {
    svg += line(px(x), top + plot_height, px(x), top + plot_height + 5, "#333333");
    svg += text(px(x), top + plot_height + 18, format_fixed(x, 0), {.size = tick_size, .anchor = "middle"});
  }
  svg += line(left, top, left, top + plot_height, "#333333");
  svg += line(left, top + plot_height, left + plot_width, top + plot_height, "#333333");
  svg += text(left + plot_width / 2, top + plot_height + 40, chart.x_label, {.size = label_size, .anchor = "middle"});
  svg += text(20, top + plot_height / 2, chart.y_label, {.size = label_size, .anchor = "middle", .rotate = -90});

  svg += "<g clip-path=\"url(#plot-area)\">\n";
  for (const ReferenceLine& reference : chart.references)
    if (std::isfinite(reference.y))
      svg +=
          line(left, py(reference.y), left + plot_width, py(reference.y), "#777777", 1.2, "stroke-dasharray=\"6 4\"");
  for (std::size_t k = 0; k < chart.series.size(); ++k) {
    const Series& s = chart.series[k];
    const std::string colour = s.colour.empty() ? std::string(palette_colour(k)) : xml_escape(s.colour);
    // One path per series; a non-finite value ends a piece ("M" starts the next).
    std::string d;
    bool pen_down = false;
    for (std::size_t i = 0; i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) {
        pen_down = false;
        continue;
      }
      if (!d.empty()) d += ' ';
      d += pen_down ? 'L' : 'M';
      d += coordinate(px(chart.x_first + double(i))) + " " + coordinate(py(s.y[i]));
      pen_down = true;
    }
    svg += "<path class=\"series\" d=\"" + d + "\" fill=\"none\" stroke=\"" + colour +
           "\" stroke-width=\"2.2\" stroke-linejoin=\"round\" stroke-linecap=\"round\"><title>" + xml_escape(s.name) +
           "</title></path>\n";
    for (std::size_t i = 0; i < s.y.size(); ++i)
      if (std::isfinite(s.y[i])) svg += marker_shape(s.marker, px(chart.x_first + double(i)), py(s.y[i]), colour);
  }
  svg += "</g>\n";
  for (const auto& [y, label] : reference_labels)
    svg += text(left + plot_width + 8, y, label, {.size = tick_size, .fill = "#555555"});

  for (std::size_t k = 0; k < chart.series.size(); ++k) {
    const Series& s = chart.series[k];
    const std::string colour = s.colour.empty() ? std::string(palette_colour(k)) : xml_escape(s.colour);
    const auto [x, y] = legend_at[k];
    svg += line(x, y, x + legend_sample, y, colour, 2.2);
    svg += marker_shape(s.marker, x + legend_sample / 2, y, colour);
    svg += text(x + legend_sample + 6, y + 4.5, legend[k], {.size = label_size});
  }
  if (chart.series.empty())
    svg += text(left + plot_width / 2, top + plot_height / 2, "no data", {.size = label_size, .anchor = "middle"});
  return svg + "</svg>\n";
}

// ---- heatmap ------------------------------------------------------------------------------------------

struct Heatmap {
  std::string title{};
  std::string row_axis{};     // e.g. "layer" or "true class"
  std::string column_axis{};  // e.g. "expert" or "predicted class"
  std::string value_label{};  // caption of the colour bar
  Index rows = 0, columns = 0;
  std::vector<double> values{};                            // [rows, columns], row-major; non-finite: n/a
  std::vector<std::string> row_labels{}, column_labels{};  // empty: 0, 1, 2, ...
  // Colour range [low, high], values outside clamp to its ends. Fix it to compare several
  // heatmaps; default: [min(0, smallest value), largest value].
  std::optional<std::array<double, 2>> value_range{};
  int decimals = 2;                                 // of the value printed in a cell (0 for counts)
  static constexpr Index max_cells_with_text = 16;  // per side: larger grids show colour only
};

// The heatmap as a complete SVG document. Each cell is one <rect class="cell">.
inline std::string heatmap_svg(const Heatmap& map) {
  using namespace detail;
  constexpr Index max_side = Index{1} << 20;
  moe::check(map.rows >= 0 && map.columns >= 0 && map.rows <= max_side && map.columns <= max_side, "report: heatmap '",
             map.title, "' has shape [", map.rows, ", ", map.columns, "]; each side must be in [0, ", max_side, "]");
  moe::check(map.values.size() == std::size_t(map.rows * map.columns), "report: heatmap '", map.title, "' has ",
             map.values.size(), " values for a [", map.rows, ", ", map.columns, "] grid");
  moe::check(map.row_labels.empty() || map.row_labels.size() == std::size_t(map.rows), "report: heatmap '", map.title,
             "' has ", map.row_labels.size(), " row labels for ", map.rows, " rows");
  moe::check(map.column_labels.empty() || map.column_labels.size() == std::size_t(map.columns), "report: heatmap '",
             map.title, "' has ", map.column_labels.size(), " column labels for ", map.columns, " columns");
  constexpr double title_size = 16, label_size = 13, tick_size = 11, top = 48;
  const auto row_label = [&](Index r) { return map.row_labels.empty() ? std::to_string(r) : map.row_labels[r]; };
  const auto column_label = [&](Index c) {
    return map.column_labels.empty() ? std::to_string(c) : map.column_labels[c];
  };

  double low = 0, high = 0;
  bool any_finite = false, any_missing = false;
  for (double v : map.values) {
    if (!std::isfinite(v)) {
      any_missing = true;
      continue;
    }
    low = std::min(low, v);
    high = any_finite ? std::max(high, v) : std::max(v, low);
    any_finite = true;
  }
  if (map.value_range) {
    low = (*map.value_range)[0];
    high = (*map.value_range)[1];
    moe::check(std::isfinite(low) && std::isfinite(high) && low < high, "report: heatmap '", map.title,
               "' has colour range [", low, ", ", high, "]; it needs finite low < high");
  } else if (!(high > low)) {
    high = low + 1;
  }

  const double cell_width = std::clamp(560.0 / double(std::max<Index>(map.columns, 1)), 12.0, 60.0);
  const double cell_height = std::clamp(360.0 / double(std::max<Index>(map.rows, 1)), 12.0, 40.0);
  double row_label_width = 0, column_label_width = 0;
  for (Index r = 0; r < map.rows; ++r) row_label_width = std::max(row_label_width, text_width(row_label(r), tick_size));
  for (Index c = 0; c < map.columns; ++c)
    column_label_width = std::max(column_label_width, text_width(column_label(c), tick_size));
  const bool rotate_columns = column_label_width > cell_width - 4;
  const double column_label_height = rotate_columns ? column_label_width * 0.71 + 12 : 16;

  // Room on the left for the row labels and for the first column's label when it is turned.
  const double left =
      std::max(34 + row_label_width + 8, rotate_columns ? column_label_width * 0.71 - cell_width / 2 + 12 : 0.0);
  const double grid_width = cell_width * double(map.columns), grid_height = cell_height * double(map.rows);
  const double bar_x = left + grid_width + 28, bar_width = 16, bar_height = std::max(grid_height, 140.0);
  const Ticks bar_ticks = nice_ticks(low, high, 5);
  double bar_label_width = 0;
  for (double v : bar_ticks.values)
    bar_label_width = std::max(bar_label_width, text_width(format_fixed(v, bar_ticks.decimals), tick_size));
  const double width = std::max(bar_x + bar_width + 8 + bar_label_width + 34, text_width(map.title, title_size) + 32);
  const double height =
      top + std::max(grid_height + 6 + column_label_height + 30, bar_height + (any_missing ? 40 : 12));

  std::string svg = open_svg(width, height, map.title);
  svg += not_available_pattern();
  svg += "<defs><linearGradient id=\"colour-scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
  for (int i = 0; i <= 10; ++i)
    svg += "<stop offset=\"" + coordinate(i / 10.0) + "\" stop-color=\"" + hex_colour(heat_colour(i / 10.0)) + "\"/>";
  svg += "</linearGradient></defs>\n";
  svg += text(left + grid_width / 2, 28, map.title, {.size = title_size, .anchor = "middle", .bold = true});

  const bool cell_text = map.rows <= Heatmap::max_cells_with_text && map.columns <= Heatmap::max_cells_with_text;
  for (Index r = 0; r < map.rows; ++r) {
    for (Index c = 0; c < map.columns; ++c) {
      const double value = map.values[std::size_t(r * map.columns + c)];
      const double x = left + cell_width * double(c), y = top + cell_height * double(r);
      const bool finite = std::isfinite(value);
      const auto rgb = heat_colour((value - low) / (high - low));
      const std::string fill = finite ? hex_colour(rgb) : "url(#not-available)";
      const std::string shown = finite ? format_fixed(value, map.decimals) : "n/a";
      svg += "<rect class=\"cell\" x=\"" + coordinate(x) + "\" y=\"" + coordinate(y) + "\" width=\"" +
             coordinate(cell_width) + "\" height=\"" + coordinate(cell_height) + "\" fill=\"" + fill +
             "\" stroke=\"#ffffff\" stroke-width=\"1\"><title>" +
             xml_escape(map.row_axis + " " + row_label(r) + ", " + map.column_axis + " " + column_label(c) + ": " +
                        (finite ? format_fixed(value, std::max(map.decimals, 4)) : "n/a")) +
             "</title></rect>\n";
      if (!cell_text) continue;
      const double size = std::min({12.0, cell_height * 0.45, (cell_width - 4) / (0.6 * double(shown.size()))});
      if (size < 7) continue;
      svg += text(x + cell_width / 2, y + cell_height / 2 + size * 0.35, shown,
                  {.size = size, .anchor = "middle", .fill = finite ? text_colour_on(rgb) : "#1a1a1a"});
    }
  }
  svg += rect(left, top, grid_width, grid_height, "none", "stroke=\"#333333\" stroke-width=\"1\"");

  // Row labels left of the grid; column labels under it, turned when they are wider than a cell.
  for (Index r = 0; r < map.rows; ++r)
    svg +=
        text(left - 6, top + cell_height * (double(r) + 0.5) + 4, row_label(r), {.size = tick_size, .anchor = "end"});
  for (Index c = 0; c < map.columns; ++c) {
    const double x = left + cell_width * (double(c) + 0.5), y = top + grid_height + 16;
    svg += rotate_columns ? text(x + 4, y - 4, column_label(c), {.size = tick_size, .anchor = "end", .rotate = -45})
                          : text(x, y, column_label(c), {.size = tick_size, .anchor = "middle"});
  }
  svg += text(left + grid_width / 2, top + grid_height + 6 + column_label_height + 14, map.column_axis,
              {.size = label_size, .anchor = "middle"});
  svg += text(18, top + grid_height / 2, map.row_axis, {.size = label_size, .anchor = "middle", .rotate = -90});

  // Colour bar with its values, and a swatch for n/a when some cell has none.
  svg += rect(bar_x, top, bar_width, bar_height, "url(#colour-scale)", "stroke=\"#333333\" stroke-width=\"0.8\"");
  for (double v : bar_ticks.values) {
    const double y = top + (high - v) / (high - low) * bar_height;
    svg += line(bar_x + bar_width, y, bar_x + bar_width + 4, y, "#333333");
    svg += text(bar_x + bar_width + 7, y + 4, format_fixed(v, bar_ticks.decimals), {.size = tick_size});
  }
  svg += text(bar_x + bar_width + 14 + bar_label_width + 8, top + bar_height / 2, map.value_label,
              {.size = label_size, .anchor = "middle", .rotate = 90});
  if (any_missing) {
    svg += rect(bar_x, top + bar_height + 14, bar_width, 14, "url(#not-available)",
                "stroke=\"#333333\" stroke-width=\"0.8\"");
    svg += text(bar_x + bar_width + 7, top + bar_height + 25, "n/a", {.size = tick_size});
  }
  if (map.rows == 0 || map.columns == 0)
    svg += text(left + 40, top + 20, "no data", {.size = label_size, .anchor = "middle"});
  return svg + "</svg>\n";
}

}  // namespace report
