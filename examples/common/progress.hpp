// examples/common/progress.hpp: training progress. On a terminal, one line redrawn in place:
//   self  [#########...........]  420/1000  loss 2.31  41.2k tok/s  ETA 1:12
// Elsewhere (a log file, CI), a plain line every `log_every` steps, so logs stay readable.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <unistd.h>

namespace train {

// "1:05", "12:00:03"
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto total = std::int64_t(seconds + 0.5);
  char text[32];
  if (total >= 3600)
    std::snprintf(text, sizeof text, "%lld:%02lld:%02lld", (long long)(total / 3600), (long long)(total / 60 % 60),
                  (long long)(total % 60));
  else
    std::snprintf(text, sizeof text, "%lld:%02lld", (long long)(total / 60), (long long)(total % 60));
  return text;
}

// "950", "41.2k", "1.3M"
inline std::string format_count(double value) {
  char text[32];
  if (value >= 1e6) std::snprintf(text, sizeof text, "%.1fM", value / 1e6);
  else if (value >= 1e4) std::snprintf(text, sizeof text, "%.1fk", value / 1e3);
  else std::snprintf(text, sizeof text, "%.0f", value);
  return text;
}

class Progress {
 public:
  // unit: what the rate counts ("tok", "img"). Writes to stderr.
  Progress(std::string label, std::int64_t total_steps, std::string unit, std::int64_t log_every = 50)
      : label_(std::move(label)),
        unit_(std::move(unit)),
        total_(total_steps),
        log_every_(log_every > 0 ? log_every : 1),
        terminal_(isatty(fileno(stderr)) != 0),
        start_(Clock::now()) {}

  // After optimizer step `step` (1-based) of total; items: processed since the start of this
  // Progress (tokens or images); loss: the step's training loss.
  void update(std::int64_t step, double items, double loss) {
    const double elapsed = seconds_since(start_);
    const double rate = elapsed > 0 ? items / elapsed : 0;
    const double eta = step > 0 ? elapsed / double(step) * double(total_ - step) : NAN;
    if (terminal_) {
      if (seconds_since(last_draw_) < 0.1 && step != total_) return;  // at most 10 redraws a second
      last_draw_ = Clock::now();
      constexpr int width = 24;
      const int filled = total_ > 0 ? int(width * step / total_) : width;
      std::string bar(std::size_t(filled), '#');
      bar.append(std::size_t(width - filled), '.');
      std::fprintf(stderr, "\r%-12s [%s] %6lld/%lld  loss %.3f  %s %s/s  ETA %s   ", label_.c_str(), bar.c_str(),
                   (long long)step, (long long)total_, loss, format_count(rate).c_str(), unit_.c_str(),
                   format_duration(eta).c_str());
      if (step == total_) std::fprintf(stderr, "\n");
    } else if (step % log_every_ == 0 || step == total_ || step == 1) {
      std::fprintf(stderr, "%s step %lld/%lld  loss %.4f  %s %s/s  elapsed %s  ETA %s\n", label_.c_str(),
                   (long long)step, (long long)total_, loss, format_count(rate).c_str(), unit_.c_str(),
                   format_duration(elapsed).c_str(), format_duration(eta).c_str());
    }
    std::fflush(stderr);
  }

  // A line that must not be overwritten (validation results): ends the bar's line first.
  void note(const std::string& line) {
    if (terminal_) std::fprintf(stderr, "\r\033[K");
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }

  double elapsed_seconds() const { return seconds_since(start_); }

 private:
  using Clock = std::chrono::steady_clock;
  static double seconds_since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  }

  std::string label_, unit_;
  std::int64_t total_, log_every_;
  bool terminal_;
  Clock::time_point start_, last_draw_{};
};

}  // namespace train
