// mtlface_infer: run an MTLFace AOTInductor package (.pt2 from `mtlface-fast export --target aoti`) from C++.
//
//   mtlface_infer PACKAGE.pt2 IMAGES.npy [--target-group G[,G...]] [--out PREFIX] [--device cpu|cuda[:i]]
//
// IMAGES.npy: float32 (B, 3, S, S) normalized to [-1, 1] (mtlface_fast.preprocess), little-endian, C order.
// Recognition packages print one line per image (age and the first embedding values) and, with --out,
// write PREFIX_embedding.npy (B, 512) and PREFIX_age.npy (B,). Synthesis packages need --target-group
// (one group for every image, or one per image) and write PREFIX_image.npy (B, 3, S, S).
// The package's export spec (entry, batch range, input size, age groups) is read from its metadata and
// inputs outside it are refused with exit status 2.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: mtlface_infer PACKAGE.pt2 IMAGES.npy [--target-group G[,G...]] [--out PREFIX] "
    "[--device cpu|cuda[:i]]";

// ---- .npy (format version 1.0 / 2.0), float32 and int64 little-endian, C order --------------------------

std::string header_value(const std::string& header, const std::string& key) {
  auto pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw UsageError("npy header has no '" + key + "': " + header);
  pos = header.find(':', pos);
  auto start = header.find_first_not_of(' ', pos + 1);
  if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
  auto end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

at::Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot open " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw UsageError(path + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16 = 0;
    in.read(reinterpret_cast<char*>(&len16), 2);
    header_len = len16;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  in.read(&header[0], header_len);
  std::string descr = header_value(header, "descr");
  if (header_value(header, "fortran_order") != "False")
    throw UsageError(path + ": Fortran-ordered arrays are not supported (save a C-ordered array)");
  at::ScalarType dtype;
  if (descr == "'<f4'") {
    dtype = at::kFloat;
  } else if (descr == "'<i8'") {
    dtype = at::kLong;
  } else {
    throw UsageError(path + ": dtype " + descr + " is not supported (float32 '<f4' images expected)");
  }
  std::vector<int64_t> shape;
  std::string dims = header_value(header, "shape");
  std::stringstream ss(dims.substr(1, dims.size() - 2));
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(item));
  }
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  if (!in) throw UsageError(path + ": file is shorter than its header says");
  return t;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.to(at::kCPU, at::kFloat).contiguous();
  std::string shape = "(";
  for (int64_t d : t.sizes()) shape += std::to_string(d) + ",";
  if (t.dim() > 1) shape.pop_back();
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream out(path + ".partial", std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  out.close();
  if (!out || std::rename((path + ".partial").c_str(), path.c_str()) != 0)
    throw std::runtime_error("cannot write " + path);
}

// ---- export spec from the package metadata ---------------------------------------------------------------

struct Spec {
  std::string entry;
  int64_t min_batch, max_batch, input_size, age_group;
};

Spec read_spec(const std::unordered_map<std::string, std::string>& meta, const std::string& package) {
  auto get = [&](const std::string& key) {
    auto it = meta.find("mtlface_fast." + key);
    if (it == meta.end())
      throw UsageError(package + " was not written by mtlface_fast.export.export_aoti (no mtlface_fast." + key +
                       " metadata)");
    return it->second;
  };
  return Spec{get("entry"), std::stoll(get("min_batch")), std::stoll(get("max_batch")),
              std::stoll(get("input_size")), std::stoll(get("age_group"))};
}

std::vector<int64_t> parse_groups(const std::string& text) {
  std::vector<int64_t> groups;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    try {
      size_t used = 0;
      groups.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw UsageError("--target-group must be an int or a comma-separated list of ints, got '" + text + "'");
    }
  }
  if (groups.empty()) throw UsageError("--target-group is empty");
  return groups;
}

int run(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string out_prefix, groups_text, device_text = "cpu";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--out") {
      out_prefix = value();
    } else if (arg == "--target-group") {
      groups_text = value();
    } else if (arg == "--device") {
      device_text = value();
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "\n";
      return 0;
    } else if (!arg.empty() && arg[0] == '-') {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) throw UsageError("expected PACKAGE.pt2 and IMAGES.npy");
  const std::string& package = positional[0];
  c10::Device device(device_text);

  auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
  Spec spec = read_spec(meta, package);

  at::Tensor images = read_npy(positional[1]);
  if (images.scalar_type() != at::kFloat || images.dim() != 4 || images.size(1) != 3 ||
      images.size(2) != spec.input_size || images.size(3) != spec.input_size)
    throw UsageError("images must be float32 (B, 3, " + std::to_string(spec.input_size) + ", " +
                     std::to_string(spec.input_size) + "), got " + c10::str(images.sizes()) + " " +
                     std::string(c10::toString(images.scalar_type())));
  const int64_t batch = images.size(0);
  if (batch < spec.min_batch || batch > spec.max_batch)
    throw UsageError("batch size " + std::to_string(batch) + " is outside the range this package was built for [" +
                     std::to_string(spec.min_batch) + ", " + std::to_string(spec.max_batch) + "]");

  std::vector<at::Tensor> inputs{images.to(device)};
  if (spec.entry == "synthesis") {
    if (groups_text.empty()) throw UsageError("this is a synthesis package: give --target-group");
    std::vector<int64_t> groups = parse_groups(groups_text);
    if (groups.size() == 1) groups.assign(static_cast<size_t>(batch), groups[0]);
    if (static_cast<int64_t>(groups.size()) != batch)
      throw UsageError("--target-group has " + std::to_string(groups.size()) + " values for " +
                       std::to_string(batch) + " images");
    for (int64_t g : groups)
      if (g < 0 || g >= spec.age_group)
        throw UsageError("--target-group values must be in [0, " + std::to_string(spec.age_group) + "), got " +
                         std::to_string(g));
    inputs.push_back(at::tensor(groups, at::TensorOptions().dtype(at::kLong)).to(device));
  } else if (spec.entry != "recognition") {
    throw UsageError("unknown entry '" + spec.entry + "' in the package metadata");
  } else if (!groups_text.empty()) {
    throw UsageError("--target-group is for synthesis packages; this one is a recognition package");
  }

  torch::inductor::AOTIModelPackageLoader loader(package, "model", false, 1,
                                                 device.has_index() ? device.index() : -1);
  c10::InferenceMode guard;
  std::vector<at::Tensor> outputs = loader.run(inputs);

  if (spec.entry == "recognition") {
    at::Tensor embedding = outputs.at(0).to(at::kCPU, at::kFloat), age = outputs.at(1).to(at::kCPU, at::kFloat);
    for (int64_t i = 0; i < batch; ++i) {
      std::cout << "image " << i << ": age " << age[i].item<float>() << " embedding[0:4]";
      for (int64_t j = 0; j < 4 && j < embedding.size(1); ++j) std::cout << " " << embedding[i][j].item<float>();
      std::cout << " norm " << embedding[i].norm().item<float>() << "\n";
    }
    if (!out_prefix.empty()) {
      write_npy(out_prefix + "_embedding.npy", embedding);
      write_npy(out_prefix + "_age.npy", age);
      std::cout << "wrote " << out_prefix << "_embedding.npy " << out_prefix << "_age.npy\n";
    }
  } else {
    at::Tensor image = outputs.at(0);
    std::cout << "synthesized " << batch << " image(s) " << c10::str(image.sizes()) << "\n";
    if (!out_prefix.empty()) {
      write_npy(out_prefix + "_image.npy", image);
      std::cout << "wrote " << out_prefix << "_image.npy\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "mtlface_infer: error: " << e.what() << "\n" << kUsage << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mtlface_infer: error: " << e.what() << "\n";
    return 1;
  }
}
