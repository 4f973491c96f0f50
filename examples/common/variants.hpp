// examples/common/variants.hpp: the FFN variants both example models compare, chosen by name at
// run time. Each name picks a model type at compile time: dense (the plain MLP) or an MoE FFN
// whose gate is one of the library's four policies.
#pragma once

#include <algorithm>
#include <iterator>
#include <string>
#include <string_view>
#include <type_traits>

#include "moe/config.hpp"
#include "moe/gate.hpp"

namespace examples {

inline constexpr std::string_view kVariants[] = {"dense", "linear", "self", "fixed-random", "random"};
inline bool known_variant(std::string_view name) { return std::ranges::find(kVariants, name) != std::end(kVariants); }

// "dense, linear, self, fixed-random, random", for the errors.
inline std::string variant_list() {
  std::string list;
  for (std::string_view v : kVariants) (list += list.empty() ? "" : ", ") += v;
  return list;
}

// Calls fn(std::type_identity<Model>{}) with the Model the name selects and returns its result.
// Models says what each name builds:
//   struct Models { using Dense = ...; template <template <class> class Gate> using MoE = ...; };
// Unknown names throw moe::Error that starts with `who` and lists the valid names.
template <class Models, class Fn>
decltype(auto) with_variant_of(std::string_view name, std::string_view who, Fn&& fn) {
  if (name == "dense") return fn(std::type_identity<typename Models::Dense>{});
  if (name == "linear") return fn(std::type_identity<typename Models::template MoE<moe::Linear>>{});
  if (name == "self") return fn(std::type_identity<typename Models::template MoE<moe::SelfRoute>>{});
  if (name == "fixed-random") return fn(std::type_identity<typename Models::template MoE<moe::FixedRandom>>{});
  if (name == "random") return fn(std::type_identity<typename Models::template MoE<moe::Random>>{});
  moe::fail(who, ": unknown variant '", name, "' (valid: ", variant_list(), ")");
}

}  // namespace examples
