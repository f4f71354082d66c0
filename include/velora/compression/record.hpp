#pragma once
/// \file
/// What VeLoRA keeps of a layer input: `activation_record` (Z and the v it was projected with,
/// written by `compressor::compress`) and `factored_gradient` (the weight gradient as A, v and
/// the scale, read by a low-rank optimizer).
#include <cstddef>
#include <cstdint>

#include "../concepts.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"

namespace velora {

template <backend B, class Rule>
class compressor;

/// What one compress call keeps for the backward pass: Z (T×G in the storage type) and a copy
/// of the v it was projected with (so later changes of v, e.g. in batch_mean mode, cannot
/// desynchronise forward and backward). Several layers that read the same input share one
/// record. A record is reused across steps without allocating once it has seen the largest T,
/// or once compressor::reserve(max_tokens, record) sized it (its Z buffer trades places with the
/// compressor's spare on every successful compress, and both have the same capacity). A
/// compress that returns a status other than ok or degenerate_input, or throws for a caller
/// mistake or an allocation failure, leaves the record exactly as it was.
template <backend B>
class activation_record {
public:
    using value_type = typename B::value_type;

    [[nodiscard]] bool empty() const noexcept { return tokens_ == 0; }
    [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
    [[nodiscard]] index_t features() const noexcept { return features_; }
    [[nodiscard]] index_t groups() const noexcept { return groups_; }
    [[nodiscard]] index_t subtoken_size() const noexcept { return subtoken_; }
    [[nodiscard]] storage z_storage() const noexcept { return storage_; }
    [[nodiscard]] value_type scale() const noexcept { return scale_; }
    /// Bytes of activation state this record stands for: T·G·sizeof(storage) + s·sizeof(value_type).
    [[nodiscard]] std::size_t bytes() const noexcept {
        return static_cast<std::size_t>(tokens_ * groups_) * storage_bytes(storage_) + static_cast<std::size_t>(subtoken_) * sizeof(value_type);
    }
    /// Bytes actually held (capacity may exceed bytes() after a larger batch).
    [[nodiscard]] std::size_t capacity_bytes() const noexcept { return z_.capacity() + v_.capacity() * sizeof(value_type); }

    /// Z as a view of its storage type U (U must match z_storage()). Backend memory.
    template <class U>
    [[nodiscard]] const_matrix_view<U> z() const {
        detail::require(storage_bytes(storage_) == sizeof(U) && !empty(), "velora::activation_record::z",
                        "requested element size ", sizeof(U), " but the record holds ", to_string(storage_),
                        empty() ? " and is empty" : "");
        return {reinterpret_cast<const U*>(z_.data()), tokens_, groups_, groups_};
    }
    /// v (s elements) in backend memory.
    [[nodiscard]] const value_type* v() const noexcept { return v_.data(); }

    /// Forgets the content (keeps the memory for reuse).
    void clear() noexcept { tokens_ = 0; }

private:
    template <backend, class>
    friend class compressor;
    typename B::template buffer<std::byte> z_;
    typename B::template buffer<value_type> v_;
    index_t tokens_ = 0, features_ = 0, groups_ = 0, subtoken_ = 0;
    storage storage_ = storage::f32;
    value_type scale_ = 1;
};

/// The weight gradient of a VeLoRA layer in factored form: dW = scale · A · (I_G ⊗ vᵀ), with
/// the last group's columns past `features` dropped. Views of backend memory; this is what a
/// low-rank optimizer can consume without ever forming the O×D gradient.
template <class T>
struct factored_gradient {
    const_matrix_view<T> a;   ///< O×G
    const T* v = nullptr;     ///< s elements, unit norm
    index_t subtoken_size = 0;
    index_t features = 0;     ///< D
    T scale = 1;
};

} // namespace velora
