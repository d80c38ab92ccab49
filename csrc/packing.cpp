// Sequence packing for ceiling-engine (pybind11 module `engine._packing`).
//
// ffd_pack:  first-fit-decreasing bin packing of sequence lengths under a token budget per
//            micro-batch. Sequences are visited longest first (ties: lower index first); each goes
//            to the lowest-numbered bin with room, found in O(log N) with a max segment tree over
//            the bins' free space. A sequence longer than the budget is an error.
// balance:   assigns micro-batches to data-parallel ranks so that token loads are balanced and every
//            rank gets the same number of micro-batches (the caller makes the count a multiple of
//            the rank count). Longest-processing-time first: micro-batches by tokens descending
//            (ties: lower index), each to the least-loaded rank that still has a free slot (ties:
//            lower rank).
//
// engine/data/packing.py holds a pure-Python twin of both that must give identical output.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Max segment tree over `n` leaves; leaf i holds the free space of bin i (budget when unused).
class FreeSpaceTree {
 public:
  FreeSpaceTree(int64_t n, int64_t budget) : size_(1) {
    while (size_ < n) size_ <<= 1;
    tree_.assign(2 * size_, 0);
    for (int64_t i = 0; i < n; ++i) tree_[size_ + i] = budget;
    for (int64_t i = size_ - 1; i >= 1; --i) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
  }
  // Lowest leaf with free space >= need (the caller guarantees one exists).
  int64_t first_fit(int64_t need) const {
    int64_t node = 1;
    while (node < size_) node = (tree_[2 * node] >= need) ? 2 * node : 2 * node + 1;
    return node - size_;
  }
  void take(int64_t leaf, int64_t amount) {
    int64_t node = size_ + leaf;
    tree_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1) tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }

 private:
  int64_t size_;
  std::vector<int64_t> tree_;
};

std::vector<std::vector<int64_t>> ffd_pack(const std::vector<int64_t>& lengths, int64_t budget) {
  if (budget <= 0) throw std::invalid_argument("token budget must be positive, got " + std::to_string(budget));
  const int64_t n = static_cast<int64_t>(lengths.size());
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0 || lengths[i] > budget) {
      throw std::invalid_argument("sequence " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                                  ", outside [1, budget=" + std::to_string(budget) + "]");
    }
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

  FreeSpaceTree tree(std::max<int64_t>(n, 1), budget);
  std::vector<std::vector<int64_t>> bins;
  for (int64_t idx : order) {
    const int64_t bin = tree.first_fit(lengths[idx]);
    if (bin == static_cast<int64_t>(bins.size())) bins.emplace_back();
    bins[bin].push_back(idx);
    tree.take(bin, lengths[idx]);
  }
  return bins;
}

std::vector<std::vector<int64_t>> balance(const std::vector<int64_t>& bin_tokens, int64_t num_ranks) {
  const int64_t m = static_cast<int64_t>(bin_tokens.size());
  if (num_ranks <= 0) throw std::invalid_argument("num_ranks must be positive");
  if (m % num_ranks != 0) {
    throw std::invalid_argument(std::to_string(m) + " micro-batches do not divide evenly over " +
                                std::to_string(num_ranks) + " ranks");
  }
  const int64_t cap = m / num_ranks;
  std::vector<int64_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return bin_tokens[a] > bin_tokens[b]; });

  using Entry = std::pair<int64_t, int64_t>;  // (load, rank): smallest load first, then lowest rank
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int64_t r = 0; r < num_ranks; ++r) heap.emplace(0, r);
  std::vector<std::vector<int64_t>> out(num_ranks);
  for (int64_t idx : order) {
    auto [load, rank] = heap.top();
    heap.pop();
    out[rank].push_back(idx);
    if (static_cast<int64_t>(out[rank].size()) < cap) heap.emplace(load + bin_tokens[idx], rank);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "First-fit-decreasing sequence packing and token-balanced rank assignment (C++).";
  m.def("ffd_pack", &ffd_pack, py::arg("lengths"), py::arg("budget"),
        "Pack sequence lengths into bins of at most `budget` tokens; returns lists of sequence indices.");
  m.def("balance", &balance, py::arg("bin_tokens"), py::arg("num_ranks"),
        "Assign bins to ranks, equal counts, balanced tokens; returns per-rank lists of bin indices.");
}
