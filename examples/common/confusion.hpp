// examples/common/confusion.hpp: a classifier's confusion matrix (true class x predicted class
// counts), the accuracy it implies, and its picture (svg_plot.hpp's heatmap, class names on the
// axes, each row normalised to rates so that classes of different sizes compare).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "svg_plot.hpp"

namespace report {

struct ConfusionMatrix {
  Index classes = 0;
  std::vector<std::int64_t> counts{};  // [classes, classes]: row = true class, column = predicted

  explicit ConfusionMatrix(Index classes_ = 0) : classes(classes_), counts(std::size_t(classes_ * classes_), 0) {
    moe::check(classes_ >= 0, "confusion matrix: classes must be >= 0, got ", classes_);
  }

  void add(Index truth, Index predicted) {
    moe::check(truth >= 0 && truth < classes && predicted >= 0 && predicted < classes, "confusion matrix: (true ",
               truth, ", predicted ", predicted, ") is outside [0, ", classes, ")");
    ++counts[std::size_t(truth * classes + predicted)];
  }
  std::int64_t at(Index truth, Index predicted) const { return counts[std::size_t(truth * classes + predicted)]; }
  std::int64_t total() const {
    std::int64_t n = 0;
    for (std::int64_t c : counts) n += c;
    return n;
  }
  std::int64_t correct() const {
    std::int64_t n = 0;
    for (Index c = 0; c < classes; ++c) n += at(c, c);
    return n;
  }
  // Top-1 accuracy: the diagonal over everything counted (NaN when nothing was).
  double accuracy() const { return total() > 0 ? double(correct()) / double(total()) : std::nan(""); }
  // Row-normalised: rate[t][p] = share of class t's images predicted as p (NaN for an empty row).
  std::vector<double> row_rates() const {
    std::vector<double> rates(counts.size());
    for (Index t = 0; t < classes; ++t) {
      std::int64_t row = 0;
      for (Index p = 0; p < classes; ++p) row += at(t, p);
      for (Index p = 0; p < classes; ++p)
        rates[std::size_t(t * classes + p)] = row > 0 ? double(at(t, p)) / double(row) : std::nan("");
    }
    return rates;
  }
};

// The picture: rows = true class, columns = predicted class, cells = row rates on [0, 1] (an
// empty row is n/a). names: one per class, or empty for 0, 1, 2, ...
inline Heatmap confusion_heatmap(const ConfusionMatrix& matrix, const std::string& title,
                                 const std::vector<std::string>& names = {}) {
  moe::check(names.empty() || Index(names.size()) == matrix.classes, "confusion matrix: ", names.size(),
             " class names for ", matrix.classes, " classes");
  return {.title = title,
          .row_axis = "true class",
          .column_axis = "predicted class",
          .value_label = "share of the true class",
          .rows = matrix.classes,
          .columns = matrix.classes,
          .values = matrix.row_rates(),
          .row_labels = names,
          .column_labels = names,
          .value_range = std::array<double, 2>{0, 1},
          .decimals = 2};
}

}  // namespace report
