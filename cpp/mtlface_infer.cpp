// mtlface_infer: run an exported MTLFace from C++: an AOTInductor package (.pt2 from `mtlface-fast export
// --target aoti`) or, when built with -DMTLFACE_WITH_TENSORRT=ON, a TensorRT engine (.engine from
// `mtlface-fast export --target tensorrt`, with its .engine.json spec beside it).
//
//   mtlface_infer PACKAGE.pt2|MODEL.engine IMAGES.npy [--target-group G[,G...]] [--out PREFIX] [--device cpu|cuda[:i]]
//
// IMAGES.npy: float32 (B, 3, S, S) normalized to [-1, 1] (mtlface_fast.preprocess), little-endian, C order.
// Recognition packages print one line per image (age and the first embedding values) and, with --out,
// write PREFIX_embedding.npy (B, 512) and PREFIX_age.npy (B,). Synthesis packages need --target-group
// (one group for every image, or one per image) and write PREFIX_image.npy (B, 3, S, S).
// The package's export spec (entry, batch range, input size, age groups) is read from its metadata and
// inputs outside it are refused with exit status 2.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#ifdef MTLFACE_WITH_TENSORRT
#include <NvInfer.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
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
    "usage: mtlface_infer PACKAGE.pt2|MODEL.engine IMAGES.npy [--target-group G[,G...]] [--out PREFIX] "
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
  int64_t min_batch = 0, max_batch = 0, input_size = 0, age_group = 0;
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

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

#ifdef MTLFACE_WITH_TENSORRT
// ---- TensorRT engines ----------------------------------------------------------------------------------

// A value of the flat JSON object written by mtlface_fast (json.dumps of the export spec).
std::string json_value(const std::string& text, const std::string& key, const std::string& path) {
  auto pos = text.find("\"" + key + "\"");
  if (pos == std::string::npos) throw UsageError(path + " has no \"" + key + "\"");
  pos = text.find(':', pos);
  auto start = text.find_first_not_of(" \t\n", pos + 1);
  if (text[start] == '"') return text.substr(start + 1, text.find('"', start + 1) - start - 1);
  auto end = text.find_first_of(",}", start);
  auto value = text.substr(start, end - start);
  return value.substr(0, value.find_last_not_of(" \t\n") + 1);
}

Spec read_engine_spec(const std::string& engine_path) {
  const std::string path = engine_path + ".json";
  std::ifstream in(path);
  if (!in)
    throw UsageError(engine_path + " has no " + path + " beside it: it was not written by "
                     "mtlface_fast.export.export_tensorrt");
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  return Spec{json_value(text, "entry", path), std::stoll(json_value(text, "min_batch", path)),
              std::stoll(json_value(text, "max_batch", path)), std::stoll(json_value(text, "input_size", path)),
              std::stoll(json_value(text, "age_group", path))};
}

class TrtLogger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << "\n";
  }
};

at::ScalarType to_scalar_type(nvinfer1::DataType type, const std::string& name) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT32: return at::kInt;
    case nvinfer1::DataType::kINT64: return at::kLong;
    case nvinfer1::DataType::kBOOL: return at::kBool;
    default: throw std::runtime_error("engine tensor " + name + " has a dtype this runner does not handle");
  }
}

std::vector<at::Tensor> run_engine(const std::string& path, const std::vector<at::Tensor>& inputs,
                                   const c10::Device& device) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot open " + path);
  std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  static TrtLogger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine) throw std::runtime_error("TensorRT could not deserialize " + path);
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  std::vector<at::Tensor> staged, outputs;
  size_t next_input = 0;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {  // inputs first: output shapes depend on them
    const char* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) continue;
    if (next_input >= inputs.size()) throw std::runtime_error(path + " has more inputs than the spec");
    at::Tensor t = inputs[next_input++].to(device, to_scalar_type(engine->getTensorDataType(name), name)).contiguous();
    nvinfer1::Dims dims;
    dims.nbDims = static_cast<int32_t>(t.dim());
    for (int64_t k = 0; k < t.dim(); ++k) dims.d[k] = t.size(k);
    if (!context->setInputShape(name, dims)) throw UsageError(std::string("input shape rejected for ") + name);
    context->setTensorAddress(name, t.data_ptr());
    staged.push_back(t);
  }
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT) continue;
    nvinfer1::Dims dims = context->getTensorShape(name);
    std::vector<int64_t> shape(dims.d, dims.d + dims.nbDims);
    at::Tensor out = at::empty(shape, at::TensorOptions()
                                          .dtype(to_scalar_type(engine->getTensorDataType(name), name))
                                          .device(device));
    context->setTensorAddress(name, out.data_ptr());
    outputs.push_back(out);
  }
  c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (!context->enqueueV3(stream.stream())) throw std::runtime_error("TensorRT execution failed");
  stream.synchronize();
  return outputs;
}
#endif  // MTLFACE_WITH_TENSORRT

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
  const bool is_engine = ends_with(package, ".engine");

  Spec spec;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  if (is_engine) {
#ifdef MTLFACE_WITH_TENSORRT
    spec = read_engine_spec(package);
    if (!device.is_cuda()) device = c10::Device(c10::kCUDA, 0);
#else
    throw UsageError("this mtlface_infer was built without TensorRT; configure with -DMTLFACE_WITH_TENSORRT=ON "
                     "(and TENSORRT_ROOT) to run .engine files");
#endif
  } else {
    std::ifstream probe(package, std::ios::binary);
    if (!probe) throw UsageError("cannot open " + package);
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package, "model", false, 1,
                                                                       device.has_index() ? device.index() : -1);
    spec = read_spec(loader->get_metadata(), package);
  }

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

  c10::InferenceMode guard;
  std::vector<at::Tensor> outputs;
  if (is_engine) {
#ifdef MTLFACE_WITH_TENSORRT
    outputs = run_engine(package, inputs, device);
#endif
  } else {
    outputs = loader->run(inputs);
  }

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
