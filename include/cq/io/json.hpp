#pragma once
/// A small, strict JSON reader and writer for safetensors headers. Inputs may be hostile: the
/// parser bounds nesting depth, rejects trailing garbage, duplicate keys, bad escapes and
/// unpaired surrogates, never reads past the given text, and takes time linear in it (duplicate
/// keys are found by hashing, not by comparing every pair).

#include "cq/error.hpp"

#include <charconv>
#include <cstdint>
#include <string>
#include <exception>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace cq::io::json {

struct Value {
  enum class Kind : std::uint8_t { null, boolean, number, string, array, object };
  Kind kind = Kind::null;
  bool boolean = false;
  double number = 0.0;
  bool is_uint = false;        // the number was written as a non-negative integer that fits u64
  std::uint64_t uint = 0;
  std::string string;
  // Arrays hold their elements in `items`; objects hold their values in `items` and the matching
  // keys in `keys`, in file order. (Parallel vectors, because a vector of pair<string, Value> would
  // need Value complete here.)
  std::vector<Value> items;
  std::vector<std::string> keys;

  std::size_t size() const { return items.size(); }
  /// The value of `key` in an object, or null. A linear scan, meant for the few keys of a tensor
  /// entry or a config section; code that visits a large object walks `keys` and `items` instead.
  const Value* find(std::string_view key) const {
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) return &items[i];
    return nullptr;
  }
};

/// A cq::Error's message without its "cq: " prefix, for errors that wrap another error's message
/// in their own context (so the prefix appears once); other exceptions' messages unchanged.
inline std::string_view bare_message(const std::exception& e) {
  std::string_view m = e.what();
  if (dynamic_cast<const Error*>(&e) != nullptr && m.starts_with("cq: ")) m.remove_prefix(4);
  return m;
}

/// Appends code point `cp` (at most U+10FFFF, not a surrogate) encoded as UTF-8.
inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// True when `s` is well-formed UTF-8 (no overlong forms, surrogates or code points past
/// U+10FFFF), as JSON text exchanged between programs must be.
inline bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = 0;
    std::uint32_t cp = 0, min = 0;
    if (c < 0x80) len = 1, cp = c;
    else if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1Fu, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0Fu, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07u, min = 0x10000;
    else return false;
    if (s.size() - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

/// Appends `s` as a JSON string literal (bytes >= 0x80 as they are: callers writing files others
/// read check valid_utf8 first).
inline void write_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

namespace detail {

// The first key of an object that occurs twice, or null. Small objects (a tensor entry) compare
// pairs; larger ones hash, so the check is linear in the number of keys.
inline const std::string* first_duplicate(const std::vector<std::string>& keys) {
  if (keys.size() <= 8) {
    for (std::size_t i = 1; i < keys.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (keys[i] == keys[j]) return &keys[i];
    return nullptr;
  }
  std::unordered_set<std::string_view> seen;
  seen.reserve(keys.size());
  for (const std::string& k : keys)
    if (!seen.insert(k).second) return &k;
  return nullptr;
}

class Parser {
 public:
  Parser(std::string_view text, int max_depth) : s_(text), max_depth_(max_depth) {}

  Value parse_document() {
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) error("unexpected trailing characters");
    return v;
  }

 private:
  [[noreturn]] void error(const char* what) const {
    cq::detail::fail("json: ", what, " at byte ", pos_);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool consume(char c) {
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!consume(c)) error("unexpected character");
  }
  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }

  Value parse_value(int depth) {
    if (depth > max_depth_) error("nesting too deep");
    skip_ws();
    if (pos_ >= s_.size()) error("unexpected end of input");
    Value v;
    const char c = s_[pos_];
    if (c == '{') {
      const std::size_t start = pos_++;
      v.kind = Value::Kind::object;
      if (consume('}')) return v;
      do {
        skip_ws();
        std::string key = parse_string();
        expect(':');
        v.items.push_back(parse_value(depth + 1));
        v.keys.push_back(std::move(key));
      } while (consume(','));
      expect('}');
      if (const std::string* dup = first_duplicate(v.keys)) {
        std::string quoted;
        write_string(quoted, *dup);
        cq::detail::fail("json: duplicate key ", quoted, " in the object at byte ", start);
      }
    } else if (c == '[') {
      ++pos_;
      v.kind = Value::Kind::array;
      if (consume(']')) return v;
      do v.items.push_back(parse_value(depth + 1));
      while (consume(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Value::Kind::string;
      v.string = parse_string();
    } else if (literal("true")) {
      v.kind = Value::Kind::boolean;
      v.boolean = true;
    } else if (literal("false")) {
      v.kind = Value::Kind::boolean;
    } else if (literal("null")) {
      v.kind = Value::Kind::null;
    } else {
      parse_number(v);
    }
    return v;
  }

  void parse_number(Value& v) {
    const std::size_t start = pos_;
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    const std::size_t int_start = pos_;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    if (pos_ == int_start) error("invalid value");
    if (s_[int_start] == '0' && pos_ - int_start > 1) error("leading zero in number");
    bool integral = true;
    if (pos_ < s_.size() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      const std::size_t f = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == f) error("invalid number");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      const std::size_t e = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == e) error("invalid number");
    }
    v.kind = Value::Kind::number;
    const char* first = s_.data() + start;
    const char* last = s_.data() + pos_;
    if (integral && *first != '-') {
      auto [p, ec] = std::from_chars(first, last, v.uint);
      v.is_uint = ec == std::errc{} && p == last;
    }
    auto [p, ec] = std::from_chars(first, last, v.number);
    if (ec == std::errc::invalid_argument || p != last) error("invalid number");
  }

  std::uint32_t hex4() {
    if (s_.size() - pos_ < 4) error("truncated \\u escape");
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<std::uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<std::uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<std::uint32_t>(h - 'A' + 10);
      else error("bad hex digit in \\u escape");
    }
    return v;
  }
  std::string parse_string() {
    if (pos_ >= s_.size() || s_[pos_] != '"') error("expected a string");
    ++pos_;
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) error("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) error("unterminated escape");
      switch (s_[pos_++]) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!literal("\\u")) error("unpaired surrogate");
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            error("unpaired surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: error("bad escape");
      }
    }
  }

  std::string_view s_;
  std::size_t pos_ = 0;
  int max_depth_;
};

}  // namespace detail

/// Parses a complete JSON document; throws cq::Error naming the byte offset of the problem.
inline Value parse(std::string_view text, int max_depth = 32) { return detail::Parser(text, max_depth).parse_document(); }

}  // namespace cq::io::json
